"""Write pandas_numpy.jsonl: short data-science questions about pandas and numpy, each with
the one line of code that answers it, in the {"prompt", "completion"} format.

    python adapters/examples/make_pandas_numpy.py            # rewrites pandas_numpy.jsonl

Deterministic: the same script writes the same bytes. Each question template is filled
with a few column names, file names and numbers, so a model can learn the templates from
the training split and be scored on held-out fills of them. Completions are kept short
so that the random demo model learns them on a CPU in a few minutes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
PER_TEMPLATE = 12
OUT = Path(__file__).with_name("pandas_numpy.jsonl")

COLUMNS = ["price", "age", "score", "sales", "city", "year", "name", "revenue", "height", "weight"]
FILES = ["data.csv", "sales.csv", "users.csv", "prices.csv", "log.csv"]

# (question, code): {c}, {d} are distinct columns; {n}, {m} small numbers; {f} a file name.
PANDAS = [
    ("How do I drop rows with missing values in column '{c}'?", "df.dropna(subset=['{c}'])"),
    ("How do I select the rows where '{c}' is greater than {n}?", "df[df['{c}'] > {n}]"),
    ("How do I compute the mean of '{c}' for each '{d}'?", "df.groupby('{d}')['{c}'].mean()"),
    ("How do I sort the DataFrame by '{c}', largest first?", "df.sort_values('{c}', ascending=False)"),
    ("How do I rename the column '{c}' to '{d}'?", "df.rename(columns={{'{c}': '{d}'}})"),
    ("How do I fill the missing values of '{c}' with {n}?", "df['{c}'].fillna({n})"),
    ("How do I count the distinct values of '{c}'?", "df['{c}'].nunique()"),
    ("How often does each value of '{c}' occur?", "df['{c}'].value_counts()"),
    ("How do I load '{f}' into a DataFrame?", "pd.read_csv('{f}')"),
    ("How do I delete the column '{c}'?", "df.drop(columns=['{c}'])"),
    ("How do I get the {n} rows with the highest '{c}'?", "df.nlargest({n}, '{c}')"),
    ("How do I join df1 and df2 on '{c}'?", "pd.merge(df1, df2, on='{c}')"),
    ("How do I take the running total of '{c}'?", "df['{c}'].cumsum()"),
    ("How do I keep only the columns '{c}' and '{d}'?", "df[['{c}', '{d}']]"),
    ("How do I save the DataFrame to '{f}' without the index?", "df.to_csv('{f}', index=False)"),
]
NUMPY = [
    ("How do I make an array of zeros with shape ({n}, {m})?", "np.zeros(({n}, {m}))"),
    ("How do I make a {n} by {n} identity matrix?", "np.eye({n})"),
    ("How do I reshape the array a to {n} rows and {m} columns?", "a.reshape({n}, {m})"),
    ("How do I find the index of the largest value of a along axis {x}?", "np.argmax(a, axis={x})"),
    ("How do I average the array a along axis {x}?", "a.mean(axis={x})"),
    ("How do I get {m} evenly spaced numbers from 0 to {n}?", "np.linspace(0, {n}, {m})"),
    ("How do I limit the values of a to the range {n} to {m}?", "np.clip(a, {n}, {m})"),
    ("How do I compute the {p}th percentile of a?", "np.percentile(a, {p})"),
    ("How do I make an array of the integers from {n} to {m}?", "np.arange({n}, {m} + 1)"),
    ("How do I replace the values of a below {n} with {n}?", "np.where(a < {n}, {n}, a)"),
    ("How do I set numpy's random seed to {n}?", "np.random.seed({n})"),
    ("How do I repeat the array a {n} times?", "np.tile(a, {n})"),
    ("How do I round the values of a to {x} decimals?", "np.round(a, {x})"),
    ("How do I sum a over axis {x}?", "a.sum(axis={x})"),
    ("How do I sort the array a in descending order?", "np.sort(a)[::-1]"),
]


def fills(rng: random.Random) -> dict:
    c, d = rng.sample(COLUMNS, 2)
    n = rng.randint(2, 9)
    return {"c": c, "d": d, "n": n, "m": n + rng.randint(1, 9), "x": rng.randint(0, 1),
            "p": rng.choice([5, 10, 25, 50, 75, 90, 95, 99]), "f": rng.choice(FILES)}


def examples(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for question, code in PANDAS + NUMPY:
        kept = 0
        for _ in range(PER_TEMPLATE * 5):  # tries: some templates have few distinct fills
            values = fills(rng)
            prompt = f"Q: {question.format(**values)}\nA: "
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "completion": code.format(**values)})
                kept += 1
            if kept == PER_TEMPLATE:
                break
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = examples()
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {OUT}")


if __name__ == "__main__":
    main()
