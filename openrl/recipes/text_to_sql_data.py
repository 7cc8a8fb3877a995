"""A small text-to-SQL dataset, generated locally and deterministically (no download).

Four sqlite databases (a shop, a school, a library, a company), each a few tables with seed
rows drawn from a seeded RNG, and question templates with their gold SQL, filled in with
values from the rows. Every example's `reference` is what the built-in `sql` reward
(`openrl.rewarder.builtin.sql_execution`) takes: {"schema": DDL, "rows": {table: rows},
"gold": query}; the reward runs the model's query and the gold in a fresh sandboxed
database built from them and compares the result sets.

    from openrl.recipes.text_to_sql_data import make_dataset
    train, heldout = make_dataset(seed=0)        # lists of Example, disjoint questions

    python -m openrl.recipes.text_to_sql_data --out data/sql   # writes train.jsonl, heldout.jsonl

Held-out questions are never in the training split. Splitting is by question text, so the
held-out set asks the training templates about other values (what a model that learned
the mapping from question to query can answer), not unseen templates.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

CITIES = ["Paris", "Lima", "Oslo", "Rome", "Cairo", "Tokyo"]
FIRST = ["Ana", "Ben", "Carla", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lea", "Milo", "Nora", "Omar", "Pia"]
PRODUCTS = ["apple", "bread", "cheese", "milk", "tea", "rice", "soap", "pen"]
SUBJECTS = ["math", "art", "music", "physics", "history"]
GENRES = ["poetry", "crime", "science", "travel"]
DEPARTMENTS = ["sales", "research", "support", "legal"]


@dataclass(frozen=True)
class Database:
    name: str
    schema: str  # DDL
    rows: dict[str, list[list]]

    def summary(self) -> str:
        """One line per table, `table(col, col, ...)`: what the prompt shows the model."""
        lines = []
        for stmt in self.schema.split(";"):
            stmt = stmt.strip()
            if not stmt:
                continue
            table = stmt.split()[2]
            cols = [c.strip().split()[0] for c in stmt[stmt.index("(") + 1 : stmt.rindex(")")].split(",")]
            lines.append(f"{table}({', '.join(cols)})")
        return "\n".join(lines)


@dataclass(frozen=True)
class Example:
    db: str
    question: str
    sql: str  # gold
    prompt: str  # the user message: schema summary + question
    reference: dict  # for the `sql` reward


def _shop(rng: random.Random) -> Database:
    customers = [[i + 1, name, rng.choice(CITIES), rng.randint(18, 70)] for i, name in enumerate(rng.sample(FIRST, 10))]
    products = [[i + 1, p, rng.randint(1, 20)] for i, p in enumerate(PRODUCTS)]
    orders = [[i + 1, rng.randint(1, 10), rng.randint(1, len(PRODUCTS)), rng.randint(1, 5)] for i in range(24)]
    schema = ("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INTEGER);"
              "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price INTEGER);"
              "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, product_id INTEGER, quantity INTEGER);")  # fmt: skip
    return Database("shop", schema, {"customers": customers, "products": products, "orders": orders})


def _school(rng: random.Random) -> Database:
    students = [[i + 1, name, rng.randint(1, 4)] for i, name in enumerate(rng.sample(FIRST, 12))]
    courses = [[i + 1, s, rng.randint(2, 6)] for i, s in enumerate(SUBJECTS)]
    grades = [[s[0], c[0], rng.randint(40, 100)] for s in students for c in courses if rng.random() < 0.5]
    schema = ("CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT, year INTEGER);"
              "CREATE TABLE courses (id INTEGER PRIMARY KEY, subject TEXT, credits INTEGER);"
              "CREATE TABLE grades (student_id INTEGER, course_id INTEGER, score INTEGER);")  # fmt: skip
    return Database("school", schema, {"students": students, "courses": courses, "grades": grades})


def _library(rng: random.Random) -> Database:
    authors = [[i + 1, name, rng.choice(CITIES)] for i, name in enumerate(rng.sample(FIRST, 6))]
    books = [[i + 1, f"book {i + 1}", rng.randint(1, 6), rng.choice(GENRES), rng.randint(1950, 2020)] for i in range(14)]
    schema = ("CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT, city TEXT);"
              "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT, author_id INTEGER, genre TEXT, year INTEGER);")  # fmt: skip
    return Database("library", schema, {"authors": authors, "books": books})


def _company(rng: random.Random) -> Database:
    employees = [[i + 1, name, rng.choice(DEPARTMENTS), rng.randint(30, 90) * 1000] for i, name in enumerate(rng.sample(FIRST, 14))]
    schema = "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department TEXT, salary INTEGER);"
    return Database("company", schema, {"employees": employees})


def _questions(db: Database) -> list[tuple[str, str]]:
    """(question, gold SQL) pairs for a database, every template filled with each value."""
    out: list[tuple[str, str]] = []
    if db.name == "shop":
        for city in CITIES:
            out.append((f"How many customers live in {city}?", f"SELECT COUNT(*) FROM customers WHERE city = '{city}'"))
            out.append((f"List the names of customers from {city}.", f"SELECT name FROM customers WHERE city = '{city}'"))
        for age in (25, 30, 40, 50, 60):
            out.append((f"How many customers are older than {age}?", f"SELECT COUNT(*) FROM customers WHERE age > {age}"))
        for price in (5, 10, 15):
            out.append((f"Which products cost less than {price}?", f"SELECT name FROM products WHERE price < {price}"))
        for name, *_ in (r[1:] for r in db.rows["customers"]):
            out.append((f"How many orders did {name} place?",
                        f"SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id WHERE customers.name = '{name}'"))  # fmt: skip
        out.append(("What is the price of the most expensive product?", "SELECT MAX(price) FROM products"))
        out.append(("How many orders are there?", "SELECT COUNT(*) FROM orders"))
    elif db.name == "school":
        for year in (1, 2, 3, 4):
            out.append((f"How many students are in year {year}?", f"SELECT COUNT(*) FROM students WHERE year = {year}"))
            out.append((f"List the names of students in year {year}.", f"SELECT name FROM students WHERE year = {year}"))
        for subject in SUBJECTS:
            out.append((f"How many credits is {subject} worth?", f"SELECT credits FROM courses WHERE subject = '{subject}'"))
            out.append((f"What is the average score in {subject}?",
                        f"SELECT AVG(score) FROM grades JOIN courses ON grades.course_id = courses.id WHERE courses.subject = '{subject}'"))  # fmt: skip
        for score in (50, 70, 90):
            out.append((f"How many grades are above {score}?", f"SELECT COUNT(*) FROM grades WHERE score > {score}"))
    elif db.name == "library":
        for genre in GENRES:
            out.append((f"How many {genre} books are there?", f"SELECT COUNT(*) FROM books WHERE genre = '{genre}'"))
            out.append((f"List the titles of {genre} books.", f"SELECT title FROM books WHERE genre = '{genre}'"))
        for year in (1970, 1990, 2000, 2010):
            out.append((f"How many books were published after {year}?", f"SELECT COUNT(*) FROM books WHERE year > {year}"))
        for city in CITIES:
            out.append((f"Which authors live in {city}?", f"SELECT name FROM authors WHERE city = '{city}'"))
        out.append(("What year was the oldest book published?", "SELECT MIN(year) FROM books"))
    elif db.name == "company":
        for dept in DEPARTMENTS:
            out.append((f"How many employees work in {dept}?", f"SELECT COUNT(*) FROM employees WHERE department = '{dept}'"))
            out.append((f"List the names of employees in {dept}.", f"SELECT name FROM employees WHERE department = '{dept}'"))
            out.append((f"What is the highest salary in {dept}?", f"SELECT MAX(salary) FROM employees WHERE department = '{dept}'"))
        for salary in (40000, 60000, 80000):
            out.append((f"How many employees earn more than {salary}?", f"SELECT COUNT(*) FROM employees WHERE salary > {salary}"))
        out.append(("What is the total salary of all employees?", "SELECT SUM(salary) FROM employees"))
    return out


def databases(seed: int = 0) -> list[Database]:
    return [make(random.Random(f"{seed}-{make.__name__}")) for make in (_shop, _school, _library, _company)]


def make_prompt(db: Database, question: str) -> str:
    return f"Database {db.name}:\n{db.summary()}\nWrite one SQLite query. {question}"


def make_dataset(seed: int = 0, heldout_fraction: float = 0.25) -> tuple[list[Example], list[Example]]:
    """(train, heldout): every templated question of every database whose gold query finds
    something, shuffled with `seed`, split by question text so no held-out question is
    asked in training."""
    from openrl.rewarder.builtin import build_database, run_query

    examples = []
    for db in databases(seed):
        reference_base = {"schema": db.schema, "rows": db.rows}
        conn = build_database(db.schema, db.rows)
        for question, sql in _questions(db):
            rows = run_query(conn, sql)
            if not rows or all(v is None for row in rows for v in row):
                continue  # an empty answer would reward any query that finds nothing
            examples.append(Example(db.name, question, sql, make_prompt(db, question), {**reference_base, "gold": sql}))
    random.Random(seed).shuffle(examples)
    n_heldout = max(1, round(len(examples) * heldout_fraction))
    return examples[n_heldout:], examples[:n_heldout]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrl.recipes.text_to_sql_data", description="write the text-to-SQL splits as JSONL")
    p.add_argument("--out", type=Path, default=Path("data/text-to-sql"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split in zip(("train", "heldout"), make_dataset(args.seed)):
        with open(args.out / f"{name}.jsonl", "w") as f:
            for ex in split:
                f.write(json.dumps(asdict(ex)) + "\n")
        print(f"{args.out / name}.jsonl: {len(split)} examples")


if __name__ == "__main__":
    main()
