"""Built-in rewards: exact match, math final answers, and text-to-SQL by execution in a
sandbox that nothing escapes (no files, no writes, no pragmas, no endless queries)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from openrl.rewarder import builtin
from openrl.rewarder.builtin import exact_match, extract_answer, math_answer, sql_execution
from openrl.rewarder.pool import Pool

from rewarder_helpers import item


@pytest.mark.parametrize(
    "completion,reference,want",
    [
        ("Paris", "Paris", 1.0),
        ("  paris. ", "Paris", 1.0),
        ('"PARIS"', "paris", 1.0),
        ("**Paris**", "Paris", 1.0),
        ("New   York", "new york", 1.0),
        ("Ｐａｒｉｓ", "Paris", 1.0),  # full-width letters (NFKC)
        ("Paris, France", "Paris", 0.0),
        ("Lyon", ["Paris", "Lyon"], 1.0),
        ("42", 42, 1.0),
        ("Rome", {"answer": "Paris"}, 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_match(completion, reference, want):
    assert exact_match("q", completion, reference) == want


def test_exact_match_refuses_a_malformed_reference():
    with pytest.raises(ValueError):
        exact_match("q", "x", {"nope": 1})
    with pytest.raises(ValueError):
        exact_match("q", "x", [])


@pytest.mark.parametrize(
    "completion,answer",
    [
        ("so the total is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{3}{4}} is it", "\\frac{3}{4}"),
        ("we get \\boxed{x^{2}+1}", "x^{2}+1"),
        ("The answer is 17.", "17"),
        ("Final answer: -3/5\nthanks", "-3/5"),
        ("first 3 then 4 and finally 12", "12"),
        ("no numbers here", None),
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize(
    "completion,reference,want",
    [
        ("\\boxed{42}", "42", 1.0),
        ("\\boxed{42}", 42, 1.0),
        ("The answer is 0.75", "3/4", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
        ("\\boxed{\\frac{6}{8}}", {"answer": "3/4"}, 1.0),
        ("answer: 1,000", "1000", 1.0),
        ("\\boxed{50\\%}", "0.5", 1.0),
        ("\\boxed{$12$}", "12.0", 1.0),
        ("so x = 2.0000000001", "2", 1.0),
        ("I think 41", "42", 0.0),
        ("\\boxed{0.33}", "1/3", 0.0),
        ("\\boxed{x^{2}+1}", "x^{2}+1", 1.0),
        ("\\boxed{x^{2}+2}", "x^{2}+1", 0.0),
        ("nothing", "42", 0.0),
        ("\\boxed{7}", ["6", "7"], 1.0),
    ],
)
def test_math_answer(completion, reference, want):
    assert math_answer("q", completion, reference) == want


# -- text-to-SQL -----------------------------------------------------------------------

SCHEMA = """
CREATE TABLE dept (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE emp (id INTEGER PRIMARY KEY, name TEXT, dept_id INTEGER REFERENCES dept(id), salary REAL);
CREATE VIEW eng AS SELECT e.name FROM emp e JOIN dept d ON d.id = e.dept_id WHERE d.name = 'eng';
"""
ROWS = {
    "dept": [[1, "eng"], [2, "ops"]],
    "emp": [[1, "ann", 1, 100.0], [2, "bob", 2, 80], [3, "cy", 1, 120], [4, "di", 2, 95.5]],
}


def ref(gold: str, **extra) -> dict:
    return {"schema": SCHEMA, "rows": ROWS, "gold": gold, **extra}


CORRECT = {"reward": 1.0, "executed": 1.0, "correct": 1.0}
WRONG = {"reward": 0.1, "executed": 1.0, "correct": 0.0}
FAILED = {"reward": 0.0, "executed": 0.0, "correct": 0.0}

GOLD = "SELECT e.name FROM emp e JOIN dept d ON d.id = e.dept_id WHERE d.name = 'eng'"


@pytest.mark.parametrize(
    "completion,want",
    [
        (GOLD, CORRECT),
        ("```sql\nSELECT name FROM emp WHERE dept_id = 1;\n```", CORRECT),  # other SQL, same rows
        ("SELECT name FROM emp WHERE dept_id = 1 ORDER BY name DESC", CORRECT),  # order does not matter here
        ("SELECT name FROM eng", CORRECT),  # views of the task are tables of the task
        ("WITH x AS (SELECT name, dept_id FROM emp) SELECT name FROM x WHERE dept_id = 1", CORRECT),
        ("SELECT name FROM emp", WRONG),
        ("SELECT name, salary FROM emp WHERE dept_id = 1", WRONG),
        ("SELECT name FROM emp WHERE dept_id = 3", WRONG),
        ("SELEC name FROM emp", FAILED),
        ("SELECT nme FROM emp", FAILED),
        ("SELECT name FROM employees", FAILED),
        ("", FAILED),
        ("I don't know", FAILED),
    ],
)
def test_sql_correct_wrong_and_non_executing(completion, want):
    assert sql_execution("q", completion, ref(GOLD)) == want


def test_sql_order_matters_only_when_the_gold_orders():
    gold = "SELECT name FROM emp ORDER BY salary DESC"
    assert sql_execution("q", "SELECT name FROM emp ORDER BY salary DESC", ref(gold)) == CORRECT
    assert sql_execution("q", "SELECT name FROM emp ORDER BY salary", ref(gold)) == WRONG
    assert sql_execution("q", "SELECT name FROM emp ORDER BY salary", ref("SELECT name FROM emp WHERE name <> 'order by'")) == CORRECT


def test_sql_numbers_compare_by_value_and_partial_credit_is_configurable():
    assert sql_execution("q", "SELECT 2.0", ref("SELECT 2")) == CORRECT
    assert sql_execution("q", "SELECT sum(salary) FROM emp", ref("SELECT 395.5")) == CORRECT
    assert sql_execution("q", "SELECT 3", ref("SELECT 2", partial_credit=0.25))["reward"] == 0.25


def test_sql_rows_can_also_come_as_insert_statements():
    reference = {"schema": "CREATE TABLE t (a INTEGER, b TEXT);", "data": "INSERT INTO t VALUES (1, 'x'); INSERT INTO t VALUES (2, 'y');",
                 "gold": "SELECT b FROM t WHERE a = 2"}  # fmt: skip
    assert sql_execution("q", "SELECT 'y'", reference) == CORRECT


@pytest.mark.parametrize(
    "reference,message",
    [
        ({"schema": SCHEMA}, "gold"),
        ("SELECT 1", "schema"),
        (ref("SELECT nope FROM emp"), "gold query does not run"),
        (ref("SELECT 1", schema="CREATE TABLE t(a); ATTACH 'x.db' AS x"), "do not build"),
        (ref("SELECT 1", schema="CREATE TABLE t(a); PRAGMA writable_schema = 1"), "do not build"),
        (ref("SELECT 1", schema="CREATE TABLE t(a); CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END"), "do not build"),
        (ref("SELECT 1", rows={"emp": [[1, {"a": 1}, 1, 1]]}), "do not build"),
    ],
)
def test_sql_a_bad_reference_is_an_error_not_a_score(reference, message):
    with pytest.raises(ValueError, match=message):
        sql_execution("q", "SELECT 1", reference)


MALICIOUS = [
    "ATTACH DATABASE '{victim}' AS v",
    "SELECT 1; ATTACH DATABASE '{new}' AS v",
    "ATTACH DATABASE '{new}' AS v; SELECT 1",
    "VACUUM INTO '{new}'",
    "INSERT INTO emp VALUES (9, 'eve', 1, 1)",
    "WITH x AS (SELECT 1) INSERT INTO emp SELECT 9, 'eve', 1, 1 FROM x",
    "UPDATE emp SET salary = 0",
    "DELETE FROM emp",
    "DROP TABLE emp",
    "CREATE TABLE evil (a)",
    "CREATE TEMP TABLE evil (a)",
    "ALTER TABLE emp ADD COLUMN x",
    "PRAGMA table_info(emp)",
    "PRAGMA query_only = OFF",
    "SELECT * FROM pragma_table_info('emp')",
    "SELECT sql FROM sqlite_master",
    "SELECT load_extension('{new}')",
    "SELECT writefile('{new}', 'x')",
    "SELECT randomblob(2000000000)",
    "SELECT zeroblob(100000000)",
    "BEGIN",
    "SAVEPOINT s",
    "REINDEX",
    "ANALYZE",
]


def _snapshot(*dirs: Path) -> dict[str, str]:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.mark.parametrize("query", MALICIOUS)
def test_sql_malicious_queries_score_zero_and_touch_nothing(query, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    victim = tmp_path / "victim.db"
    with sqlite3.connect(victim) as conn:
        conn.execute("CREATE TABLE t (a)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    before = _snapshot(tmp_path)
    mtime = victim.stat().st_mtime_ns
    q = query.format(victim=victim, new=tmp_path / "new.db")
    assert sql_execution("q", q, ref(GOLD)) == FAILED
    assert _snapshot(tmp_path) == before
    assert victim.stat().st_mtime_ns == mtime
    assert not (tmp_path / "new.db").exists() and not any(work.iterdir())


@pytest.mark.parametrize("timeout_s", ["nan", "1", float("nan"), float("inf"), -1, 0, True, None, [1]])
def test_sql_timeout_s_must_be_a_finite_number_above_zero(timeout_s):
    with pytest.raises(ValueError, match="timeout_s must be a finite number"):
        sql_execution("q", GOLD, ref(GOLD, timeout_s=timeout_s))


def test_sql_timeout_s_above_the_bound_is_clamped(monkeypatch):
    seen = []
    real = builtin.run_query
    monkeypatch.setattr(builtin, "run_query", lambda conn, sql, timeout_s: seen.append(timeout_s) or real(conn, sql, timeout_s))
    assert sql_execution("q", GOLD, ref(GOLD, timeout_s=1e9)) == CORRECT
    assert sql_execution("q", GOLD, ref(GOLD, timeout_s=3)) == CORRECT
    assert seen == [builtin.SQL_MAX_TIMEOUT_S] * 2 + [3.0] * 2


def test_sql_setup_scripts_are_stopped_at_the_setup_time_limit():
    forever = "INSERT INTO t WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r;"
    started = time.monotonic()
    with pytest.raises(ValueError, match="longer than 0.5 s to build"):
        builtin.build_database("CREATE TABLE t (a INTEGER);", data=forever, timeout_s=0.5)
    assert time.monotonic() - started < 2.0
    with pytest.raises(ValueError, match="longer than 0.5 s to build"):  # in the schema script too
        builtin.build_database("CREATE TABLE t (a INTEGER); " + forever, timeout_s=0.5)


def test_sql_a_query_that_runs_forever_is_stopped_at_the_time_limit():
    forever = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    started = time.monotonic()
    assert sql_execution("q", forever, ref(GOLD, timeout_s=0.5)) == FAILED
    assert 0.4 < time.monotonic() - started < 2.0
    cross = "SELECT count(*) FROM emp a, emp b, emp c, emp d, emp e, emp f, emp g, emp h, emp i, emp j, emp k, emp l, emp m, emp n"
    started = time.monotonic()
    assert sql_execution("q", cross, ref(GOLD, timeout_s=0.5)) == FAILED
    assert time.monotonic() - started < 2.0
    huge = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 50000) SELECT n FROM r"
    assert sql_execution("q", huge, ref(GOLD)) == FAILED  # more rows than a result may have


async def test_builtins_in_real_workers(tmp_path, monkeypatch):
    """The built-ins as `openrl up` runs them: in the worker processes, from their names."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim.db"
    pools = {name: Pool(fn, name, 1, timeout_s=10, memory_mb=512) for name, fn in builtin.REWARDS.items()}
    for pool in pools.values():
        await pool.start()
    try:
        assert (await pools["exact_match"].score(item(" Paris.", reference="paris"))).reward == 1.0
        assert (await pools["math"].score(item("... so \\boxed{\\frac{1}{2}}", reference="0.5"))).reward == 1.0
        sql = pools["sql"]
        assert (await sql.score(item("SELECT name FROM eng", reference=ref(GOLD)))).metrics == CORRECT
        assert (await sql.score(item(f"ATTACH '{victim}' AS v", reference=ref(GOLD)))).reward == 0.0
        forever = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r"
        score = await sql.score(item(forever, reference=ref(GOLD, timeout_s=1)))
        assert score.reward == 0.0 and 0.9 < score.seconds < 3
        bad = await sql.score(item("SELECT 1", reference={"schema": "nope"}))
        assert bad.error_kind == "exception" and "gold" in bad.error
        assert sql.replaced == 0
    finally:
        for pool in pools.values():
            await pool.close()
    assert not victim.exists() and os.listdir(tmp_path) == []
