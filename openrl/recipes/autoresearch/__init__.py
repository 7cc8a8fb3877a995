"""Autoresearch: many experiments at once on one stack, proposed and judged automatically
(`openrl autoresearch STUDY_DIR`; docs/autoresearch.md). A study is a folder with program.md
and study.toml (openrl.recipes.autoresearch.study); researchers (harness) loop propose -> run
-> judge -> keep or discard, proposed by Optuna or an agent command (proposers), recorded in a
ledger (ledger) and summed up at the end (report)."""
