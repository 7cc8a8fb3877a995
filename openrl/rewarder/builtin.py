"""Built-in reward functions: plain functions of strings, like any user's.

- `exact_match`: the completion equals the reference after normalisation.
- `math_answer`: the completion's final answer (\\boxed{}, "the answer is", or the last
  number) equals the reference, numerically where both are numbers (fractions included).
- `sql_execution`: text-to-SQL scored by running the query in a fresh sandboxed sqlite
  database built from the task's schema and rows, and comparing result sets with the gold
  query's (see `sql_execution`).

They run in the rewarder's worker processes like user code does: a query that the sandbox
misses still meets the per-call timeout and memory limit.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
import unicodedata
from collections import Counter
from fractions import Fraction

# What `openrl up` starts and `openrl rewarder --fn <name>` accepts: name -> module:function.
REWARDS = {
    "exact_match": "openrl.rewarder.builtin:exact_match",
    "math": "openrl.rewarder.builtin:math_answer",
    "sql": "openrl.rewarder.builtin:sql_execution",
}


def _answers(reference: object) -> list[object]:
    """A reference is the answer, a list of accepted answers, or {"answer": ...} / {"answers": [...]}."""
    if isinstance(reference, dict):
        if "answers" in reference:
            reference = reference["answers"]
        elif "answer" in reference:
            reference = reference["answer"]
        else:
            raise ValueError('reference must be an answer, a list of answers, or {"answer": ...}')
    answers = reference if isinstance(reference, list) else [reference]
    if not answers or any(a is None or isinstance(a, dict | list) for a in answers):
        raise ValueError(f"reference answers must be strings or numbers, got {reference!r}")
    return answers


# -- exact match -----------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_EDGE = "\"'`.,;:!?()[]{}<>*_ "


def normalize_text(s: str) -> str:
    """NFKC, case-folded, whitespace collapsed, surrounding quotes/punctuation/markdown removed."""
    s = unicodedata.normalize("NFKC", str(s)).casefold()
    return _SPACE.sub(" ", s).strip(_EDGE + "\n\t")


def exact_match(prompt: str, completion: str, reference: object) -> float:
    """1.0 if the completion equals one of the reference answers after `normalize_text`."""
    got = normalize_text(completion)
    return 1.0 if any(got == normalize_text(str(a)) for a in _answers(reference)) else 0.0


# -- math final answer -------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a worked solution: the last \\boxed{}, else what follows the last
    "answer is"/"answer:", else the last number; None if there is none."""
    boxed = _boxed(completion)
    if boxed is not None:
        return boxed.strip()
    said = None
    for said in _ANSWER_IS.finditer(completion):
        pass
    if said is not None:
        text = said.group(1).strip().split("\n")[0]
        return text.rstrip(". ").strip() or None
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\^\\circ|\\%|%")


def to_number(s: object) -> Fraction | float | None:
    """A number from an answer string: integers, decimals, 1,000, -3/4, \\frac{3}{4}, 50%, 2.5e3."""
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return Fraction(s)
    if isinstance(s, float):
        return Fraction(s) if math.isfinite(s) else None
    text = str(s).strip()
    percent = text.endswith("%") or text.endswith("\\%")
    text = _LATEX_FRAC.sub(r"(\1)/(\2)", text)
    text = _LATEX_NOISE.sub("", text).replace(" ", "").rstrip(".")
    text = text.removeprefix("x=").removeprefix("=")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    m = re.fullmatch(r"\(?(-?[\d.]+(?:e-?\d+)?)\)?(?:/\(?(-?[\d.]+)\)?)?", text, re.IGNORECASE)
    if not m:
        return None
    try:
        value = Fraction(m.group(1))
        if m.group(2) is not None:
            value /= Fraction(m.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def math_answer(prompt: str, completion: str, reference: object) -> float:
    """1.0 if the completion's final answer equals a reference answer: numerically when both
    parse as numbers (3/4 = 0.75 = \\frac{3}{4}; decimals within 1e-6 relative), otherwise
    as normalised text."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    got_n = to_number(got)
    for answer in _answers(reference):
        want_n = to_number(answer)
        if got_n is not None and want_n is not None:
            if got_n == want_n or math.isclose(float(got_n), float(want_n), rel_tol=1e-6, abs_tol=1e-9):
                return 1.0
        elif normalize_text(_LATEX_NOISE.sub("", got)) == normalize_text(_LATEX_NOISE.sub("", str(answer))):
            return 1.0
    return 0.0


# -- text-to-SQL by execution ----------------------------------------------------------------

SQL_TIMEOUT_S = 2.0  # per query, unless the reference's "timeout_s" says otherwise
SQL_MAX_TIMEOUT_S = 30.0  # the most a reference's "timeout_s" may ask for (larger values are clamped)
SQL_SETUP_TIMEOUT_S = 10.0  # building the task's database (schema, rows, data scripts)
SQL_MAX_ROWS = 10_000  # a result with more rows counts as a failed query
SQL_MAX_LENGTH = 1_000_000  # largest string or blob a query may build, in bytes
SQL_PARTIAL_CREDIT = 0.1  # a query that runs but returns the wrong rows
# Functions a query may not call even though the authorizer otherwise allows functions.
_DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit", "zipfile", "sqlar_compress", "sqlar_uncompress"}
_FENCE = re.compile(r"```(?:sql|sqlite)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


class SqlFailed(Exception):
    """The query did not run (syntax, denied, too slow, too big)."""


def extract_sql(completion: str) -> str:
    """The last ```sql fenced block, else the whole completion; without a trailing ';'."""
    blocks = _FENCE.findall(completion)
    sql = blocks[-1] if blocks else completion
    return sql.strip().rstrip(";").strip()


def _is_ordered(sql: str) -> bool:
    """Whether the query's result order is meaningful (it has an ORDER BY outside literals)."""
    bare = _COMMENTS.sub(" ", _STRINGS.sub("''", sql))
    return re.search(r"\border\s+by\b", bare, re.IGNORECASE) is not None


def _normalize_row(row: tuple) -> tuple:
    """2 and 2.0 are the same answer; floats compare to 6 significant digits."""
    out = []
    for v in row:
        if isinstance(v, float):
            v = int(v) if v.is_integer() and abs(v) < 2**53 else float(f"{v:.6g}")
        out.append(v)
    return tuple(out)


def _setup_authorizer(action, arg1, arg2, db, trigger):
    """While the task's database is built: schema and rows only, no files, no pragmas."""
    # (CREATE writes sqlite_master, seen here as INSERT/UPDATE on it; editing the schema
    # by hand needs PRAGMA writable_schema, which is denied.)
    allowed = {
        sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_CREATE_VIEW, sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE,
        sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_REINDEX,
    }  # fmt: skip
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY


def _query_authorizer(tables: set[str]):
    """For the model's query: SELECT from the task's tables, nothing else."""

    def authorize(action, arg1, arg2, db, trigger):
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            # count(*) reads no column of its source (a table, a CTE, a subquery): arg2 "", no db.
            whole_row = db is None and not arg2
            return sqlite3.SQLITE_OK if (arg1 or "").lower() in tables or whole_row else sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION:
            return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    return authorize


def build_database(
    schema: str, rows: dict[str, list[list]] | None = None, data: str = "", timeout_s: float = SQL_SETUP_TIMEOUT_S
) -> sqlite3.Connection:
    """A fresh in-memory database from DDL (`schema`), rows per table and/or INSERT statements
    (`data`), locked down for queries: no ATTACH (limit 0), no writes (query_only), an
    authorizer that allows reading the task's tables only. Building it takes at most
    `timeout_s`: the progress handler is on before any setup script runs (a recursive INSERT
    in `data` is stopped, not run forever)."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=True)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # no ATTACH, no VACUUM INTO: no files
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQL_MAX_LENGTH)
    conn.execute("PRAGMA trusted_schema = OFF")
    conn.set_authorizer(_setup_authorizer)
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        conn.executescript(schema)
        for table, values in (rows or {}).items():
            if not values:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
                raise ValueError(f"reference rows: bad table name {table!r}")
            width = len(values[0])
            conn.executemany(f'INSERT INTO "{table}" VALUES ({", ".join("?" * width)})', values)
        if data:
            conn.executescript(data)
    except (sqlite3.Error, OverflowError, MemoryError) as e:
        conn.close()
        if time.monotonic() > deadline:
            raise ValueError(f"reference schema/data took longer than {timeout_s:g} s to build") from None
        raise ValueError(f"reference schema/data do not build: {e}") from None
    conn.set_progress_handler(None, 0)
    conn.set_authorizer(None)
    tables = {name.lower() for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_query_authorizer(tables))
    return conn


def query_timeout(reference: dict) -> float:
    """The reference's "timeout_s" (default SQL_TIMEOUT_S): a number > 0, clamped to at most
    SQL_MAX_TIMEOUT_S. Anything else (a string such as "nan", a bool, NaN, infinity, zero or
    less) is refused: a reference that cannot say how long a query may run is a bad reference."""
    value = reference.get("timeout_s", SQL_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"sql reference timeout_s must be a finite number of seconds > 0 (at most {SQL_MAX_TIMEOUT_S:g} is used), got {value!r}")
    return min(float(value), SQL_MAX_TIMEOUT_S)


def run_query(conn: sqlite3.Connection, sql: str, timeout_s: float = SQL_TIMEOUT_S) -> list[tuple]:
    """The rows of one SELECT, or SqlFailed: one statement only, at most `timeout_s`, at most
    SQL_MAX_ROWS rows."""
    if not sql:
        raise SqlFailed("empty query")
    bare = _COMMENTS.sub(" ", sql).lstrip().lower()
    if not (bare.startswith("select") or bare.startswith("with") or bare.startswith("values") or bare.startswith("(")):
        raise SqlFailed("only SELECT queries are allowed")
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        cursor = conn.execute(sql)  # raises for more than one statement
        rows = cursor.fetchmany(SQL_MAX_ROWS + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as e:
        if time.monotonic() > deadline:
            raise SqlFailed(f"query ran longer than {timeout_s:g} s") from None
        raise SqlFailed(f"{type(e).__name__}: {e}") from None
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > SQL_MAX_ROWS:
        raise SqlFailed(f"query returned more than {SQL_MAX_ROWS} rows")
    return rows


def sql_execution(prompt: str, completion: str, reference: dict) -> dict[str, float]:
    """Text-to-SQL by execution. `reference`: {"schema": DDL, "rows": {table: [[...], ...]}
    and/or "data": INSERT statements, "gold": the gold query, optional "partial_credit",
    "timeout_s"}. The completion's query (a ```sql block or the whole text) and the gold run
    in the same fresh database; result sets compare as multisets unless the gold has
    ORDER BY. Reward: 1 if they match, `partial_credit` (0.1) if the query runs but
    differs, 0 if it does not run. Also reports "executed" and "correct" (0/1)."""
    if not isinstance(reference, dict) or not isinstance(reference.get("schema"), str) or not isinstance(reference.get("gold"), str):
        raise ValueError('sql reference must be {"schema": str, "gold": str, "rows"?: {...}, "data"?: str}')
    partial = float(reference.get("partial_credit", SQL_PARTIAL_CREDIT))
    timeout_s = query_timeout(reference)
    conn = build_database(reference["schema"], reference.get("rows"), reference.get("data", ""))
    try:
        try:
            gold = run_query(conn, reference["gold"], timeout_s)
        except SqlFailed as e:
            raise ValueError(f"the gold query does not run: {e}") from None
        try:
            got = run_query(conn, extract_sql(completion), timeout_s)
        except SqlFailed:
            return {"reward": 0.0, "executed": 0.0, "correct": 0.0}
    finally:
        conn.close()
    gold_n = [_normalize_row(r) for r in gold]
    got_n = [_normalize_row(r) for r in got]
    correct = got_n == gold_n if _is_ordered(reference["gold"]) else Counter(got_n) == Counter(gold_n)
    return {"reward": 1.0 if correct else partial, "executed": 1.0, "correct": 1.0 if correct else 0.0}
