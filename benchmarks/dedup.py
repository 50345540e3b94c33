"""Benchmark `selfalign.dedup.rouge_l_filter` against the rouge-score brute force.

Prompt sets are generated (seeded) from ~50 instruction templates with slot
fillers plus random word edits, so near-duplicates are common but not trivial.
The reference is the Self-Instruct pool filter: tokenize every prompt once, then
score each new prompt against all kept ones with `rouge_scorer._score_lcs`,
single process, stopping at the first score >= threshold (early exit makes it a
slightly *stronger* baseline than Self-Instruct, which scores every pair).

    python benchmarks/dedup.py --sizes 2000 5000 20000   (numbers go to benchmarks/RESULTS.md)
"""
import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rouge_score import rouge_scorer  # noqa: E402

from selfalign.dedup import rouge_l_filter  # noqa: E402

TEMPLATES = [
    "Write a {adj} poem about {topic}.",
    "Write a short story about {topic} for {audience}.",
    "Explain {topic} to {audience} in simple terms.",
    "Give me {num} tips for {activity}.",
    "What are the main differences between {topic} and {topic2}?",
    "Summarize the following article about {topic} in {num} sentences.",
    "Translate the sentence about {topic} into {language}.",
    "Write a {adj} email to {person} asking about {topic}.",
    "Create a lesson plan on {topic} for {audience}.",
    "List {num} common mistakes people make when {activity}.",
    "Describe the history of {topic} in a {adj} way.",
    "Generate {num} interview questions about {topic}.",
    "Write a product description for a {adj} {object}.",
    "How can I improve my skills in {activity}?",
    "Compose a tweet announcing a new {object} for {audience}.",
    "What is the best way to learn about {topic}?",
    "Write a {language} function that sorts a list of {object} names.",
    "Suggest {num} names for a {adj} {object}.",
    "Classify the following review of a {object} as positive or negative.",
    "Rewrite this paragraph about {topic} to sound more {adj}.",
    "Create a workout plan for {audience} who enjoy {activity}.",
    "Write a dialogue between {person} and a robot about {topic}.",
    "Give an example of how {topic} affects everyday life.",
    "Explain why {topic} matters for {audience}.",
    "Write a recipe that uses {food} and {food2}.",
    "Plan a {num} day trip to {place} for {audience}.",
    "What are the pros and cons of {activity}?",
    "Draft a cover letter for a job related to {topic}.",
    "Write a haiku about {food} in {place}.",
    "Design a quiz with {num} questions on {topic}.",
    "Argue for or against banning {object} in {place}.",
    "Give feedback on this essay about {topic} written by {person}.",
    "Write a limerick about {person} and a {adj} {object}.",
    "Convert this list of {object} prices into a table.",
    "Propose a research question about {topic} and {topic2}.",
    "Describe a typical day of {person} in {place}.",
    "Brainstorm {num} slogans for a campaign about {topic}.",
    "Explain how to cook {food} without an oven.",
    "Write a motivational speech for {audience} about {activity}.",
    "Identify the logical fallacy in this argument about {topic}.",
    "Create a budget for {audience} who want to start {activity}.",
    "Write a news headline about {topic} in {place}.",
    "What questions should I ask before buying a {adj} {object}?",
    "Compare {food} and {food2} in terms of nutrition.",
    "Write a {adj} thank-you note to {person}.",
    "Outline a blog post on {topic} for {audience}.",
    "Explain the rules of {activity} to {audience}.",
    "Write song lyrics about {place} and {topic}.",
    "Give step-by-step instructions for {activity}.",
    "Predict how {topic} will change over the next {num} years.",
]
SLOTS = {
    "adj": "funny sad formal casual persuasive short detailed friendly humorous "
           "serious playful poetic concise elegant cheerful spooky modern".split(),
    "topic": ["climate change", "machine learning", "the French revolution",
              "photosynthesis", "black holes", "the stock market", "vaccines",
              "social media", "renewable energy", "ancient Rome", "quantum computing",
              "the water cycle", "democracy", "blockchain", "volcanoes", "sleep",
              "urban gardening", "the human brain", "space exploration", "inflation",
              "jazz music", "plate tectonics", "electric cars", "honey bees",
              "the printing press", "cybersecurity", "ocean tides", "meditation",
              "the immune system", "coral reefs", "artificial intelligence",
              "public transport", "recycling", "the Olympic games", "chess openings"],
    "audience": ["children", "teenagers", "college students", "retirees", "beginners",
                 "software engineers", "nurses", "busy parents", "small business owners",
                 "high school teachers", "new employees", "tourists"],
    "num": "three five seven ten twelve 3 5 7 10 20".split(),
    "activity": ["public speaking", "running a marathon", "learning a language",
                 "baking bread", "saving money", "writing code", "playing guitar",
                 "painting with watercolors", "hiking", "managing a team", "studying for exams",
                 "job hunting", "gardening", "swimming", "photography"],
    "language": "French Spanish German Japanese Python JavaScript Rust Italian Korean".split(),
    "person": ["a landlord", "my manager", "a customer", "a professor", "an old friend",
               "my grandmother", "a pirate", "a detective", "a chef", "the mayor"],
    "object": "laptop backpack smartphone bicycle coffee-maker headphones tent watch "
              "lamp chair notebook drone umbrella".split(),
    "food": "pasta tofu mushrooms lentils salmon avocado rice chickpeas spinach eggs".split(),
    "place": ["Paris", "Tokyo", "the Sahara", "a small village", "New York", "the moon",
              "a rainforest", "Iceland", "a submarine", "Cairo"],
}
SLOTS["topic2"], SLOTS["food2"] = SLOTS["topic"], SLOTS["food"]
NOISE = ("please also really quickly carefully briefly now again maybe "
         "kindly simply just the a some this that your our every").split()


def make_prompts(n, seed=0):
    """Deterministic prompt set with a realistic near-duplicate rate."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(TEMPLATES).format(
            **{k: rng.choice(v) for k, v in SLOTS.items()})
        words = text.split()
        for _ in range(rng.choice((0, 1, 1, 2, 3, 4))):
            op, j = rng.random(), rng.randrange(len(words))
            if op < 0.4:
                words[j] = rng.choice(NOISE)
            elif op < 0.7:
                words.insert(j, rng.choice(NOISE))
            elif op < 0.85 and len(words) > 3:
                del words[j]
            elif j + 1 < len(words):
                words[j], words[j + 1] = words[j + 1], words[j]
        out.append(" ".join(words))
    return out


def reference_filter(texts, threshold):
    """Self-Instruct's filter: pre-tokenize, _score_lcs against every kept text."""
    tokenizer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer
    kept, kept_tokens = [], []
    for i, text in enumerate(texts):
        tokens = tokenizer.tokenize(text)
        if any(rouge_scorer._score_lcs(tokens, other).fmeasure >= threshold
               for other in kept_tokens):
            continue
        kept.append(i)
        kept_tokens.append(tokens)
    return kept


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def machine():
    try:
        model = next(line.split(":", 1)[1].strip()
                     for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                     .stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    import os
    from importlib.metadata import version
    return (f"{os.cpu_count()} cores, {model}; Python {platform.python_version()}; "
            f"rapidfuzz {version('rapidfuzz')}; rouge-score {version('rouge-score')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000])
    ap.add_argument("--reference-max", type=int, default=20000,
                    help="skip the (slow) reference for larger sizes")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="ours: best of N runs")
    ap.add_argument("--out", type=Path, help="also write the markdown fragment here")
    ap.add_argument("--reference-cache", type=Path,
                    help="JSON file reusing/storing measured reference runs (kept "
                         "indices and seconds), so ours can be re-timed without "
                         "re-running the slow reference")
    args = ap.parse_args()
    cache, reused = {}, []
    if args.reference_cache and args.reference_cache.exists():
        cache = json.loads(args.reference_cache.read_text())

    rows = ["| n | kept | reference s | ours s | speed-up | identical |",
            "|---:|---:|---:|---:|---:|:---:|"]
    for n in args.sizes:
        texts = make_prompts(n, args.seed)
        ours, t_ours = min((timed(rouge_l_filter, texts, args.threshold)
                            for _ in range(args.repeats)), key=lambda r: r[1])
        if n <= args.reference_max:
            key = f"n={n} seed={args.seed} threshold={args.threshold}"
            if key in cache:
                reused.append(n)
            else:
                cache[key] = timed(reference_filter, texts, args.threshold)
                if args.reference_cache:
                    args.reference_cache.write_text(json.dumps(cache))
            ref, t_ref = cache[key]
            rows.append(f"| {n} | {len(ours)} | {t_ref:.1f} | {t_ours:.3f} | "
                        f"{t_ref / t_ours:.0f}x | {'yes' if ref == ours else 'NO'} |")
        else:
            rows.append(f"| {n} | {len(ours)} | not run | {t_ours:.3f} | - | - |")
        print(rows[-1], file=sys.stderr, flush=True)
    table = "\n".join(rows)
    note = (f"Machine: {machine()}.\n\nThreshold {args.threshold}, seed {args.seed}; "
            "reference = Self-Instruct-style rouge-score brute force (pre-tokenized "
            "`_score_lcs`, single process, early exit on first hit); ours = best of "
            f"{args.repeats} runs of `rouge_l_filter`; identical = same kept indices.")
    if reused:
        note += (f" Reference times for n={reused} were reused from an earlier "
                 "measured run (--reference-cache), not re-measured.")
    print(table + "\n\n" + note)
    if args.out:
        args.out.write_text("## ROUGE-L dedup benchmark\n\n" + table + "\n\n" + note + "\n")


if __name__ == "__main__":
    main()
