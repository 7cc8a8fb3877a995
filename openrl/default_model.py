"""The model `openrl up` serves when no base model is given: a tiny Qwen3 built here, offline.

Nothing is downloaded. On first use we train a byte-level BPE tokenizer with Qwen3's special
tokens and chat format, give a 4-layer Qwen3 a short seeded warm-up on synthetic chat tasks
(two-digit arithmetic, say-the-word, repeat-after-me) so RL has signal to start from, and
install the result in the Hugging Face hub cache as `openrl/tiny-qwen3`. From then on the
normal HF code path (`AutoTokenizer.from_pretrained("openrl/tiny-qwen3")`, with
`HF_HUB_OFFLINE=1`) finds it, which is how the tinker SDK and tinker-cookbook load tokenizers.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import structlog
from filelock import FileLock, Timeout

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "openrl/tiny-qwen3"

# Part of the revision hash, with this file's source and the versions of the packages whose
# numbers the build depends on (BUILD_PACKAGES): a cached model is reused only if it was built by
# the same code with the same packages, so a cache never hides what a fresh machine would build.
BUILD_VERSION = 2
BUILD_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors")
WARMUP_STEPS = 600
# The build runs on this many torch threads whatever the machine: CPU matmuls split their sums
# by thread, so another count gives other weights. With it, a build is bit-for-bit the same for
# a given lock and CPU.
BUILD_THREADS = 2
# What the full warm-up must reach (checked at build time; a build outside them fails, with
# its report): the demos and RL recipes start from these skills. Tests never rely on them.
BUILD_BOUNDS = {"copy_accuracy": 0.8, "repeat_accuracy": 0.5}
VOCAB_SIZE = 1024
ARCH = dict(
    hidden_size=192,
    intermediate_size=576,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
# Share of arithmetic and say-the-word among chat tasks; the rest is repeat-after-me.
TASK_MIX = (0.35, 0.3)

# Qwen3's specials. <think> tags are plain added tokens in Qwen3 (shown when decoding).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ADDED_TOKENS = ("<think>", "</think>")

# Qwen3's chat format, without its tool-calling and thinking branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2/3's pre-tokenizer split: one digit per token, which is what makes arithmetic learnable.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The copy/recall toy task's vocabulary; RL tasks draw their words from here.
COPY_WORDS: tuple[str, ...] = (
    "apple", "banana", "orange", "grape", "lemon", "cherry", "bread", "cheese", "water", "milk",
    "cat", "dog", "horse", "bird", "fish", "mouse", "tiger", "lion", "rabbit", "house",
    "tree", "river", "mountain", "ocean", "cloud", "rain", "snow", "sun", "moon", "star",
    "book", "pen", "paper", "chair", "table", "door", "window", "car", "train", "boat",
    "red", "blue", "green", "yellow", "black", "white", "happy", "music", "garden", "friend",
)  # fmt: skip

# Filler for the plain-text part of the corpus: enough everyday words that the BPE vocabulary
# is not only the task words, and the model can babble English-looking text in demos.
_SUBJECTS = (
    "the cat", "my friend", "a bird", "the dog", "our teacher", "the child", "a man", "she", "he",
    "a doctor", "the king", "my mother", "your brother", "the old woman", "a young girl", "the farmer",
)  # fmt: skip
_VERBS = (
    "likes", "sees", "wants", "has", "finds", "draws", "reads about", "talks about", "remembers",
    "carries", "watches", "paints", "forgets", "buys", "sells", "follows", "builds", "cleans",
)  # fmt: skip
_ADJECTIVES = (
    "small", "large", "quiet", "bright", "dark", "warm", "cold", "quick", "slow", "beautiful",
    "strange", "simple", "heavy", "gentle", "famous", "empty", "little", "clever", "early", "late",
)  # fmt: skip
_PLACES = (
    "kitchen", "school", "village", "city", "forest", "station", "market", "library", "office",
    "beach", "park", "island", "bridge", "hospital", "museum", "street", "country", "world",
)  # fmt: skip
_TIMES = (
    "in the morning", "at night", "every day", "on Monday", "on Friday", "last week", "yesterday",
    "tomorrow", "in the summer", "during winter", "after dinner", "before breakfast",
)  # fmt: skip
_TEMPLATES = (
    "{s} {v} the {w}.",
    "Today {s} {v} a {a} {w} near the {w2}.",
    "The {w} is next to the {w2} in the {p}.",
    "I think {s} {v} the {w} and the {w2}.",
    "Here is a list: {w}, {w2}, {w3}.",
    "There are {n} {w}s in the {p}.",
    "{t}, {s} {v} a {a} {w}.",
    "Why does {s} always bring a {w} to the {p}?",
    "We walked to the {p} {t} because the {w} was {a}.",
    "\"Look at the {a} {w}!\" said {s}.",
)


def copy_prompt(word: str) -> list[dict]:
    """Chat messages asking the model to say `word` back; the answer is `word` alone."""
    return [{"role": "user", "content": f"Say the word: {word}"}]


def _arithmetic_task(rng: random.Random) -> tuple[list[dict], str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return [{"role": "user", "content": f"What is {a}+{b}?"}], str(a + b)
    a, b = max(a, b), min(a, b)  # keep answers non-negative: one less thing to learn
    return [{"role": "user", "content": f"What is {a}-{b}?"}], str(a - b)


def _repeat_task(rng: random.Random) -> tuple[list[dict], str]:
    if rng.random() < 0.5:
        seq = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 5)))
    else:
        seq = " ".join(rng.choices(COPY_WORDS, k=rng.randint(2, 4)))
    return [{"role": "user", "content": f"Repeat after me: {seq}"}], seq


def _sample_task(rng: random.Random) -> tuple[list[dict], str]:
    """One synthetic chat task: (prompt messages, expected answer)."""
    kind = rng.random()
    if kind < TASK_MIX[0]:
        return _arithmetic_task(rng)
    if kind < TASK_MIX[0] + TASK_MIX[1]:
        word = rng.choice(COPY_WORDS)
        return copy_prompt(word), word
    return _repeat_task(rng)


def _sample_text(rng: random.Random) -> str:
    """A sentence or two of plain text, so the model is not only a chat-format machine."""
    out = []
    for _ in range(rng.randint(1, 2)):
        w, w2, w3 = rng.sample(COPY_WORDS, 3)
        t = rng.choice(_TEMPLATES).format(
            s=rng.choice(_SUBJECTS), v=rng.choice(_VERBS), a=rng.choice(_ADJECTIVES), p=rng.choice(_PLACES),
            t=rng.choice(_TIMES), w=w, w2=w2, w3=w3, n=rng.randint(2, 99),
        )
        out.append(t[0].upper() + t[1:])
    return " ".join(out)


def _train_tokenizer(rng: random.Random, vocab_size: int):
    """Byte-level BPE on the synthetic corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so any text (any unicode) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_sample_text(rng) for _ in range(4000)]
    for _ in range(4000):
        messages, answer = _sample_task(rng)
        corpus.append(messages[0]["content"] + "\n" + answer)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens(list(ADDED_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _model_config(vocab_size: int, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        **ARCH,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        dtype="float32",
    )


def _encode_example(tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """(tokens, loss weights): chat tasks train on the answer and <|im_end|>, text on all of it."""
    if rng.random() < 0.1:
        ids = tokenizer.encode(_sample_text(rng) + ENDOFTEXT)
        return ids, [1] * len(ids)
    messages, answer = _sample_task(rng)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode(answer + IM_END)
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids)


def _batch(tokenizer, rng: random.Random, size: int):
    import torch

    examples = [_encode_example(tokenizer, rng) for _ in range(size)]
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((size, width), tokenizer.pad_token_id)
    weights = torch.zeros((size, width))
    for i, (ids, w) in enumerate(examples):
        tokens[i, : len(ids)] = torch.tensor(ids)
        weights[i, : len(w)] = torch.tensor(w, dtype=torch.float)
    return tokens, weights


def _warm_up(model, tokenizer, rng: random.Random, steps: int, batch_size: int = 64) -> list[float]:
    """Plain AdamW with linear warm-up and cosine decay. Returns the loss per step."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    ramp = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / ramp) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    from tqdm.auto import tqdm

    model.train()
    losses = []
    # A bar on a terminal (openrl up, openrl prepare); nothing in a log file (disable=None).
    for _ in tqdm(range(steps), desc=f"building {DEFAULT_MODEL} (once)", unit="step", disable=None):
        tokens, weights = _batch(tokenizer, rng, batch_size)
        logits = model(input_ids=tokens).logits[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        w = weights[:, 1:].flatten()
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _greedy_accuracy(model, tokenizer, tasks: list[tuple[list[dict], str]], max_new_tokens: int = 12) -> float:
    """Fraction of tasks whose greedy completion is exactly the answer followed by <|im_end|>."""
    import torch

    right = 0
    with torch.no_grad():
        for messages, answer in tasks:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            right += out[0, ids.shape[1] :].tolist() == tokenizer.encode(answer + IM_END)
    return right / len(tasks)


def build_default_model(out_dir: Path, *, warmup_steps: int, seed: int = 0) -> dict:
    """Build the tokenizer and warmed-up model into `out_dir` (save_pretrained layout). Returns stats."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        # fork_rng: seeding must not disturb the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rng = random.Random(seed)
            tokenizer = _train_tokenizer(rng, vocab_size=VOCAB_SIZE)
            model = Qwen3ForCausalLM(_model_config(len(tokenizer), tokenizer))
            losses = _warm_up(model, tokenizer, rng, warmup_steps)
            # Held out: a fresh stream, so repeat-after-me and arithmetic prompts are mostly unseen.
            eval_rng = random.Random(seed + 1)
            copy_acc = _greedy_accuracy(model, tokenizer, [(copy_prompt(w), w) for w in COPY_WORDS])
            repeat_acc = _greedy_accuracy(model, tokenizer, [_repeat_task(eval_rng) for _ in range(50)])
            arith_acc = _greedy_accuracy(model, tokenizer, [_arithmetic_task(eval_rng) for _ in range(50)])
    finally:
        torch.set_num_threads(threads)

    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=[model.config.eos_token_id, model.config.bos_token_id],  # as Qwen3 ships it
        pad_token_id=model.config.pad_token_id,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stats = {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "warmup_steps": warmup_steps,
        "seconds": round(time.monotonic() - started, 1),
        "loss_start": round(sum(losses[:10]) / len(losses[:10]), 3) if losses else None,
        "loss_end": round(sum(losses[-10:]) / len(losses[-10:]), 3) if losses else None,
        "copy_accuracy": copy_acc,
        "repeat_accuracy": repeat_acc,
        "arithmetic_accuracy": arith_acc,
        "weights_sha256": _fingerprint(model),
        "packages": _package_versions(),
    }
    log.info("default_model_built", **stats)
    return stats


# -- end of the build recipe: the cache key hashes the source above this line (revision()) --


class BuildOutOfBounds(RuntimeError):
    """The warm-up did not reach BUILD_BOUNDS: the model would not serve the demos."""


def check_bounds(stats: dict) -> None:
    """Raise BuildOutOfBounds, naming every figure below its bound, for a full build."""
    low = {k: stats[k] for k, bound in BUILD_BOUNDS.items() if stats[k] < bound}
    if stats["loss_end"] >= stats["loss_start"] / 2:
        low["loss_end"] = stats["loss_end"]
    if low:
        raise BuildOutOfBounds(
            f"the default model's warm-up missed its bounds {BUILD_BOUNDS} (and loss_end < loss_start / 2): "
            f"got {low}; full report: {json.dumps(stats)}"
        )


def _fingerprint(model) -> str:
    """sha256 over the weights in name order: equal builds have equal fingerprints."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in BUILD_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _recipe_source() -> bytes:
    """This file's source up to the end-of-recipe marker: the code that determines the weights.
    Edits below it (the cache, the lock, fetching, messages) keep the cache key, so they do not
    force every cache to rebuild."""
    source = Path(__file__).read_bytes()
    end = source.index(b"# -- end of the build recipe")
    return source[:end]


def revision(warmup_steps: int = WARMUP_STEPS) -> str:
    """The snapshot name: a hash of everything that determines the build, git-commit shaped."""
    recipe = {
        "build_version": BUILD_VERSION,
        "model": DEFAULT_MODEL,
        "vocab_size": VOCAB_SIZE,
        "arch": ARCH,
        "warmup_steps": warmup_steps,
        "threads": BUILD_THREADS,
        "builder": hashlib.sha256(_recipe_source()).hexdigest(),
        "packages": _package_versions(),
    }
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE / HF_HOME honoured, as everywhere in HF)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_path(cache: Path | None = None, *, warmup_steps: int = WARMUP_STEPS) -> Path:
    repo = (cache or cache_dir()) / ("models--" + DEFAULT_MODEL.replace("/", "--"))
    return repo / "snapshots" / revision(warmup_steps)


def ensure_default_model(cache: Path | None = None, *, warmup_steps: int = WARMUP_STEPS) -> Path:
    """The default model's snapshot folder, built and installed in the HF cache on first use.

    Safe to call from several processes at once: one builds under a file lock, the others
    wait and reuse its result. A half-built model is never visible: the build goes to a
    temporary folder that is renamed into place, then `refs/main` is pointed at it.
    """
    snap = snapshot_path(cache, warmup_steps=warmup_steps)
    repo = snap.parent.parent
    ref = repo / "refs" / "main"  # what `from_pretrained(DEFAULT_MODEL)` resolves offline
    if (snap / _DONE).exists() and ref.exists() and ref.read_text().strip() == snap.name:
        return snap
    repo.mkdir(parents=True, exist_ok=True)
    with _locked(repo / ".openrl-build.lock"):
        if not (snap / _DONE).exists():
            log.info("default_model_building", name=DEFAULT_MODEL, path=str(snap), warmup_steps=warmup_steps)
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=repo))
            try:
                stats = build_default_model(tmp, warmup_steps=warmup_steps)
                if warmup_steps == WARMUP_STEPS:  # shorter builds are for tests
                    check_bounds(stats)
                (tmp / _DONE).write_text(json.dumps(stats, indent=2) + "\n")
                snap.parent.mkdir(exist_ok=True)
                shutil.rmtree(snap, ignore_errors=True)  # an unfinished copy from an older layout
                os.replace(tmp, snap)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = ref.with_name(".main.tmp")
        tmp_ref.write_text(snap.name)
        os.replace(tmp_ref, ref)
    return snap


class AliasError(Exception):
    """An alias that would shadow something in the HF cache that openrl did not put there."""


_ALIAS_MARK = "openrl-alias.json"


def install_alias(name: str, cache: Path | None = None, *, warmup_steps: int = WARMUP_STEPS) -> Path:
    """Make the default model loadable under another hub name, in this HF cache only.

    Tools with a fixed model registry (tinker-cookbook's recipes accept only the models they
    know) can then run against the offline default model: `openrl up --base-model NAME` and
    the client's `AutoTokenizer.from_pretrained(NAME)` both resolve to it. The alias is a
    cache entry like any other (`refs/main` -> a snapshot that links to the default model's),
    marked as openrl's; an entry that is not (a real download) is never touched.
    """
    if name.count("/") != 1 or any(not part or part in (".", "..") or not all(c.isalnum() or c in "-_." for c in part) for part in name.split("/")):
        raise AliasError(f"alias must be a hub name 'org/model' (letters, digits, '-', '_', '.'), got {name!r}")
    if name == DEFAULT_MODEL:
        raise AliasError(f"{name} is the default model itself")
    snap = ensure_default_model(cache, warmup_steps=warmup_steps)
    repo = snap.parent.parent.parent / ("models--" + name.replace("/", "--"))
    mark = repo / _ALIAS_MARK
    if repo.exists() and not mark.exists():
        raise AliasError(
            f"{name} is already in the HF cache at {repo} and is not an openrl alias; "
            "point HF_HOME at a separate cache for the alias"
        )
    (repo / "snapshots").mkdir(parents=True, exist_ok=True)
    link = repo / "snapshots" / snap.name
    if not link.exists():
        tmp = link.with_name(".link.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(snap, link.parent), target_is_directory=True)
        os.replace(tmp, link)
    mark.write_text(json.dumps({"alias_of": DEFAULT_MODEL, "revision": snap.name}) + "\n")
    (repo / "refs").mkdir(exist_ok=True)
    tmp_ref = repo / "refs" / ".main.tmp"
    tmp_ref.write_text(snap.name)
    os.replace(tmp_ref, repo / "refs" / "main")
    return link


def remove_alias(name: str, cache: Path | None = None) -> bool:
    """Undo `install_alias`; False when there was no openrl alias of that name."""
    repo = (cache or cache_dir()) / ("models--" + name.replace("/", "--"))
    if not (repo / _ALIAS_MARK).exists():
        return False
    shutil.rmtree(repo)
    return True


def build_stats(snap: Path) -> dict:
    """What the build recorded (loss, greedy accuracies, seconds) for a finished snapshot."""
    return json.loads((Path(snap) / _DONE).read_text())


def resolve_model_path(name: str) -> str:
    """A path or hub name `from_pretrained` can load: the default model is built on first use."""
    if name == DEFAULT_MODEL:
        return str(ensure_default_model())
    return name


_DONE = "openrl-build.json"

# What a base model needs from the hub: config, weights, tokenizer. Not other formats'
# weights (*.bin, *.pt, *.gguf, onnx/), which many repos also carry.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelUnavailable(Exception):
    """A base model that is neither a local folder nor fetchable (offline and not cached, unknown, gated)."""


def fetch_model(name: str) -> str:
    """A hub model's snapshot folder in the HF cache, downloaded first when the hub is reachable
    (huggingface_hub's progress bars on a terminal). Offline (HF_HUB_OFFLINE=1) a cached snapshot
    is used as it is. A local folder is returned unchanged; the default model is built."""
    if name == DEFAULT_MODEL:
        return str(ensure_default_model())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(name, allow_patterns=MODEL_FILES)
    except GatedRepoError as e:
        raise ModelUnavailable(f"{name} is gated on the Hugging Face hub: accept its terms there and set HF_TOKEN ({e})") from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"{name} is not a model on the Hugging Face hub (nor a local folder); "
                               "a private one needs HF_TOKEN") from None
    except HFValidationError:
        raise ModelUnavailable(f"{name!r} is neither a local folder nor a hub name 'org/model'") from None
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"{name} is not in the Hugging Face cache ({cache_dir()}) and the hub cannot be reached "
            "(HF_HUB_OFFLINE=1, or no network): run `openrl prepare " + name + "` where it can, "
            "with the same HF_HOME, or give a local folder"
        ) from None
    except OSError as e:  # the network failing midway, a full disk
        raise ModelUnavailable(f"cannot fetch {name}: {e}") from None


@contextlib.contextmanager
def _locked(path: Path):
    """Held by one process at a time (filelock: flock on POSIX, released if the holder dies)."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("default_model_waiting", lock=str(path), reason="another process is building it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
