#!/usr/bin/env python3
"""Deterministic generator of varied, ordinary English prompts.

Sources of text (all local, no network):
  * real English prose: paragraphs of the Python standard library's docstrings
    (filtered to prose-like paragraphs) and of /usr/share/common-licenses;
  * real code snippets: short function bodies from the standard library's source;
  * templated natural sentences and questions (everyday topics, numbers, dates,
    prices, measurements).

    python3 gen_prompts.py OUT.jsonl [N_CHAT] [N_COMPLETIONS] [SEED]

Each line: {"id":..., "kind":"chat"|"completions", "messages":[...]} or
{"id":..., "kind":"completions", "prompt":"..."}; target lengths are
log-uniform between 1 and ~3,000 words.
"""
import ast
import glob
import inspect
import json
import math
import os
import random
import re
import sys
import sysconfig

STDLIB = sysconfig.get_paths()["stdlib"]


def prose_paragraphs():
    paras = []
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))
    for f in files:
        try:
            src = open(f, encoding="utf-8").read()
            tree = ast.parse(src)
        except Exception:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for p in re.split(r"\n\s*\n", doc):
                    p = " ".join(p.split())
                    words = p.split()
                    if len(words) < 8:
                        continue
                    letters = sum(c.isalpha() or c == " " for c in p)
                    if letters / len(p) < 0.9:  # skip code-heavy/tabular ones
                        continue
                    if any(t in p for t in (">>>", "::", "==", "->")):
                        continue
                    paras.append(p)
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isdir(f):
            continue
        try:
            txt = open(f, encoding="utf-8").read()
        except Exception:
            continue
        for p in re.split(r"\n\s*\n", txt):
            p = " ".join(p.split())
            if len(p.split()) >= 12 and sum(c.isalpha() or c == " " for c in p) / len(p) > 0.9:
                paras.append(p)
    # dedupe, keep order
    seen, out = set(), []
    for p in paras:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def code_snippets():
    snips = []
    for name in ["textwrap.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
                 "colorsys.py", "calendar.py", "statistics.py", "glob.py", "string.py",
                 "base64.py", "difflib.py", "random.py", "json/encoder.py"]:
        f = os.path.join(STDLIB, name)
        try:
            src = open(f, encoding="utf-8").read()
            tree = ast.parse(src)
        except Exception:
            continue
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno <= 30:
                snips.append("\n".join(lines[node.lineno - 1: node.end_lineno]))
    return snips


PEOPLE = ["my sister", "our manager", "the new intern", "a friend of mine", "my neighbour",
          "the landlord", "my doctor", "the team lead", "my grandfather", "a colleague",
          "the teacher", "our accountant", "the customer", "my brother-in-law"]
TOPICS = ["the quarterly budget", "a trip to Portugal", "the garden", "our wedding plans",
          "the database migration", "a birthday party", "the school project", "a job interview",
          "the kitchen renovation", "the marketing campaign", "a science fair", "the monthly report",
          "the bike repair", "the conference schedule", "a new recipe", "the football season",
          "the car insurance", "the hiking route", "the library fundraiser", "the server outage"]
VERBS = ["asked about", "complained about", "was excited about", "forgot about", "wrote an email about",
         "spent the afternoon on", "made a spreadsheet for", "could not stop talking about",
         "needs help with", "is worried about", "finally finished"]
ADVS = ["yesterday", "last week", "this morning", "on Tuesday", "after lunch", "before the meeting",
        "over the weekend", "late last night", "earlier today", "in March"]
QSTARTS = ["Can you explain", "How do I", "What is the best way to", "Why does", "Could you help me",
           "Is it possible to", "What happens when", "Where can I find", "When should I", "Who decides"]
QBODIES = ["write a polite reminder to a client who has not paid an invoice",
           "convert a recipe that serves four people into one that serves ten",
           "the moon look bigger near the horizon",
           "plan a three day itinerary in Kyoto on a budget",
           "summarize the main causes of the First World War",
           "set up a weekly backup of my photos",
           "improve my sleep if I work night shifts",
           "the price of coffee change so much from year to year",
           "negotiate a higher salary without sounding rude",
           "compare renting and buying a house in a big city",
           "teach a ten year old about fractions",
           "fix a leaking kitchen tap",
           "understand compound interest",
           "the committee approve a new park in the neighbourhood",
           "choose between two job offers",
           "write a cover letter for a nursing position",
           "train for a half marathon in twelve weeks",
           "keep basil alive on a windowsill"]
UNITS = ["kilometres", "dollars", "euros", "minutes", "hours", "kilograms", "people", "pages",
         "square metres", "litres", "percent", "days"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)
        self.prose = prose_paragraphs()
        self.code = code_snippets()

    def sentence(self):
        r = self.r
        k = r.random()
        if k < 0.35:
            s = f"{r.choice(PEOPLE).capitalize()} {r.choice(VERBS)} {r.choice(TOPICS)} {r.choice(ADVS)}."
        elif k < 0.6:
            s = f"{r.choice(QSTARTS)} {r.choice(QBODIES)}?"
        elif k < 0.85:
            n = r.choice([r.randint(2, 99), r.randint(100, 9999), round(r.uniform(0.5, 500), 2)])
            s = (f"On {r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1990, 2026)} we measured "
                 f"{n} {r.choice(UNITS)}, which is about {r.randint(2, 95)}% more than "
                 f"the {r.choice(['previous', 'expected', 'average', 'planned'])} figure.")
        else:
            s = (f"The total came to ${r.randint(3, 4999)}.{r.randint(0, 99):02d} for "
                 f"{r.randint(1, 40)} items, so each one cost roughly ${r.randint(1, 300)}.")
        return s

    def unit(self):
        """One chunk of text: a sentence, a prose paragraph, or a code snippet."""
        r = self.r.random()
        if r < 0.45:
            return " ".join(self.sentence() for _ in range(self.r.randint(1, 4)))
        if r < 0.9:
            return self.r.choice(self.prose)
        code = self.r.choice(self.code)
        lead = self.r.choice(["Here is the function:", "What does this code do?",
                              "Please review this snippet.", "I found this in our codebase:",
                              "Can you add type hints to this?"])
        return f"{lead}\n\n```python\n{code}\n```"

    def text(self, target_words):
        if target_words <= 3:
            words = self.sentence().split()
            return " ".join(words[:target_words]).rstrip(",") if target_words < len(words) else " ".join(words)
        parts, n = [], 0
        while n < target_words:
            u = self.unit()
            uw = len(u.split())
            if n + uw > target_words * 1.15 and n > 0:
                # trim a prose unit to fit
                if "```" not in u:
                    u = " ".join(u.split()[: max(1, target_words - n)])
                    uw = len(u.split())
                else:
                    break
            parts.append(u)
            n += uw
        sep = "\n\n" if self.r.random() < 0.6 else " "
        return sep.join(parts)

    def target(self, max_words=3000):
        return max(1, int(round(math.exp(self.r.uniform(0, math.log(max_words))))))

    def chat(self):
        r = self.r
        n = r.randint(1, 6)
        roles = []
        if n >= 2 and r.random() < 0.5 or (n == 1 and r.random() < 0.15):
            roles.append("system")
        while len(roles) < n:
            roles.append("user" if (len(roles) == 0 or roles[-1] != "user") else "assistant")
        if n > 1 and roles[-1] != "user" and r.random() < 0.8:
            roles[-1] = "user" if roles[-2] != "user" else roles[-1]
        total = self.target()
        # split total words across messages (Dirichlet-ish)
        w = [r.random() + 0.1 for _ in roles]
        s = sum(w)
        msgs = []
        for role, wi in zip(roles, w):
            tw = max(1, int(round(total * wi / s)))
            if role == "system":
                content = r.choice(["You are a helpful assistant.",
                                    "You are a concise assistant. Answer in plain English.",
                                    "You are an expert software engineer who explains things clearly.",
                                    "You are a friendly travel agent."])
                if tw > 12:
                    content += " " + self.text(tw)
            else:
                content = self.text(tw)
            msgs.append({"role": role, "content": content})
        return msgs


def main():
    out = sys.argv[1]
    n_chat = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    n_comp = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 20240607
    g = Gen(seed)
    with open(out, "w") as f:
        for i in range(n_chat):
            f.write(json.dumps({"id": f"chat-{i}", "kind": "chat", "messages": g.chat()}) + "\n")
        for i in range(n_comp):
            f.write(json.dumps({"id": f"comp-{i}", "kind": "completions", "prompt": g.text(g.target())}) + "\n")
    print(f"{out}: {n_chat} chat, {n_comp} completions; {len(g.prose)} prose paragraphs, {len(g.code)} code snippets")


if __name__ == "__main__":
    main()
