"""Eight small, real labelled text sets for the small-data walkthrough: Debian package descriptions by section.

Reads `apt-cache dumpavail` (run `apt-get update` once first), keeps one item per distinct short
description, and writes `text-csv` folders (train.csv / test.csv with columns text,label):

    OUT/debian6: 6 sections (games, science, sound, graphics, net, text), 100 train + 50 test each
    OUT/debian5: 5 other sections (mail, editors, video, database, math), 80 train + 40 test each
    OUT/debian7: 7 more sections (admin, devel, electronics, fonts, localization, web, x11), 60 train + 40 test each
    OUT/lang6: 6 programming-language sections (python, perl, ruby, haskell, javascript, java), 50 train + 40 test each
    OUT/desk4: 4 sections (gnome, kde, httpd, interpreters), 80 train + 40 test each
    OUT/lang8: 8 more language sections (rust, golang, gnu-r, php, ocaml, lisp, cli-mono) and tex,
               60 train + 40 test each
    OUT/mix12: 12 sections in their natural proportions, so the classes are imbalanced (libs 258 training
               items, editors 18): 1,200 train + 600 test
    OUT/fresh6: 6 sections used for no design decision, a check made last (otherosfs, kernel, hamradio,
               comm, vcs, introspection), 60 train + 40 test each

Usage: python examples/debian_text_sets.py OUT
The exact items depend on the machine's package lists (here: Debian bookworm + bookworm-security).
"""

import csv
import random
import subprocess
import sys
from pathlib import Path

SETS = {
    "debian6": (["games", "science", "sound", "graphics", "net", "text"], 100, 50, 0),
    "debian5": (["mail", "editors", "video", "database", "math"], 80, 40, 1),
    "debian7": (["admin", "devel", "electronics", "fonts", "localization", "web", "x11"], 60, 40, 2),
    "lang6": (["python", "perl", "ruby", "haskell", "javascript", "java"], 50, 40, 3),
    "desk4": (["gnome", "kde", "httpd", "interpreters"], 80, 40, 4),
    "lang8": (["rust", "golang", "gnu-r", "php", "ocaml", "lisp", "cli-mono", "tex"], 60, 40, 11),
    "fresh6": (["otherosfs", "kernel", "hamradio", "comm", "vcs", "introspection"], 60, 40, 21),
}
# Sections, train items, test items, seed of the set drawn in the sections' natural proportions.
NATURAL_SETS = {
    "mix12": (["utils", "libs", "devel", "admin", "net", "games", "doc", "python", "science", "sound", "graphics",
               "editors"], 1200, 600, 7),
}


def descriptions() -> dict[str, str]:
    """Short description -> archive section (the first package listing a description keeps it)."""
    raw = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    sections: dict[str, str] = {}
    for block in raw.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith(" "):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Section") and fields.get("Description"):
            sections.setdefault(fields["Description"], fields["Section"].split("/")[-1])
    return sections


def write_set(out: Path, labelled: dict[str, str], sections: list[str], n_train: int, n_test: int, seed: int):
    rng = random.Random(seed)
    rows: dict[str, list] = {"train": [], "test": []}
    for section in sections:
        items = sorted(text for text, label in labelled.items() if label == section)
        rng.shuffle(items)
        if len(items) < n_train + n_test:
            raise SystemExit(f"section {section} has only {len(items)} distinct descriptions")
        rows["train"] += [(text, section) for text in items[:n_train]]
        rows["test"] += [(text, section) for text in items[n_train:n_train + n_test]]
    for split_rows in rows.values():
        rng.shuffle(split_rows)
    write_csvs(out, rows, len(sections))


def write_natural_set(out: Path, labelled: dict[str, str], sections: list[str], n_train: int, n_test: int,
                      seed: int):
    """Items of `sections` drawn at random from all of them, so each class keeps its share of the archive."""
    pool = [(text, label) for text, label in labelled.items() if label in sections]
    random.Random(seed).shuffle(pool)
    if len(pool) < n_train + n_test:
        raise SystemExit(f"sections {', '.join(sections)} have only {len(pool)} distinct descriptions")
    write_csvs(out, {"train": pool[:n_train], "test": pool[n_train:n_train + n_test]}, len(sections))


def write_csvs(out: Path, rows: dict[str, list], num_classes: int):
    out.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(split_rows)
    print(f"{out}: {len(rows['train'])} train, {len(rows['test'])} test, {num_classes} classes")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
    labelled = descriptions()
    for name, (sections, n_train, n_test, seed) in SETS.items():
        write_set(root / name, labelled, sections, n_train, n_test, seed)
    for name, (sections, n_train, n_test, seed) in NATURAL_SETS.items():
        write_natural_set(root / name, labelled, sections, n_train, n_test, seed)
