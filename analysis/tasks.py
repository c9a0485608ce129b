"""Task datasets for circuit discovery (docs/methods.md §10.1-10.2), built by code for a model's tokenizer.

Three tasks, each a batch of clean prompts, their minimally corrupted ("patch") counterparts of the same token length,
and per prompt the answer tokens with weights, so the metric is one formula for every task:

    m(prompt) = sum_j weights[j] * logits[last position, ids[j]]      (logit difference correct - incorrect)

- `ioi`: "When Mary and John went to the store, John gave a drink to" -> " Mary" (+1) vs " John" (-1), ABBA and BABA
  orders; patch = ABC corruption: the first-clause names become two fresh names, so the repeated subject no longer
  tells which name is the indirect object (SAECIRC `gen_prompt_counterfact`, simplified).
- `greater_than`: "The war lasted from the year 1732 to the year 17" -> a year after 32. When the tokenizer has
  single tokens for two-digit numbers the answers are YY > 32 (+) vs YY < 32 (-) (Hanna et al.); when it splits
  digits (SmolLM2 and the tiny model do) the answer is the tens digit: digits > 3 (+) vs digits < 3 (-), 3 being
  ambiguous. Patch = "...year 1701...".
- `sva`: subject-verb agreement, "The key to the cabinets" -> " is" (+) vs " are" (-), half the prompts with plural
  subjects (answers swapped); patch = the same prompt with the subject's number flipped.

Names and words that are several tokens for the tokenizer are skipped and counted (`TaskData.skipped`); prompts of a
length other than the most common one are dropped (all prompts of a batch must align position by position).

`build_split` / `split_task` cut a batch into a discovery split (to find a circuit) and an evaluation split (to
measure it), as SFC finds circuits on `*_train.json` and scores them on `*_test.json`: identical prompts stay on one
side, and the answers are spread evenly over both.
"""
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

TASKS = ("ioi", "greater_than", "sva")

NAMES = [" Mary", " John", " Tom", " James", " Anne", " Emma", " Elizabeth", " Jane", " Henry", " Charles", " George",
         " William", " Robert", " Lucy", " Sarah", " Alice", " David", " Michael", " Paul", " Peter", " Mark", " Kate",
         " Laura", " Susan", " Edward", " Frank", " Harry", " Fanny", " Catherine", " Thomas", " Richard", " Maria", " Marianne",
         " Bingley", " Harriet", " Darcy", " Bennet", " Elinor"]
PLACES = [" store", " garden", " house", " park", " church", " school", " market", " room", " place"]
OBJECTS = [" drink", " book", " letter", " ring", " gift", " present"]
IOI_TEMPLATE = "When{A} and{B} went to the{place},{S} gave a{obj} to"
GT_NOUNS = [" war", " reign", " drought", " journey", " project", " siege", " voyage", " treaty", " visit"]
GT_TEMPLATE = "The{noun} lasted from the year {century}{yy:02d} to the year {century}"
SVA_NOUNS = [(" key", " keys"), (" dog", " dogs"), (" girl", " girls"), (" boy", " boys"), (" book", " books"),
             (" man", " men"), (" woman", " women"), (" house", " houses"), (" friend", " friends"),
             (" letter", " letters"), (" child", " children"), (" horse", " horses"), (" lady", " ladies"),
             (" officer", " officers"), (" sister", " sisters"), (" brother", " brothers"),
             (" hand", " hands"), (" thing", " things"), (" mother", " mothers")]
SVA_ATTRACTORS = [" house", " garden", " church", " table", " park", " room", " place"]
SVA_TEMPLATE = "The{subject} near the{attractor}"
SVA_VERBS = (" is", " are")


class TaskError(ValueError):
    """A task that cannot be built for this tokenizer; the message says why."""


@dataclass
class TaskData:
    """A task's batch, aligned position by position."""

    name: str
    clean: Tensor  # [batch, seq] token ids, BOS first
    patch: Tensor  # [batch, seq] the corrupted prompts
    ids: Tensor  # [batch, n_answers] answer token ids
    weights: Tensor  # [batch, n_answers] +1/n for correct, -1/n for incorrect, 0 for padding
    prompts: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    """Words or names skipped (value: how many), e.g. names that are several tokens for this tokenizer."""
    note: str = ""
    split: str = "all"
    """Which part of the built batch this is: "all", "discovery" or "evaluation"."""

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return self.clean.shape[0]

    def subset(self, indices: list[int], split: str) -> "TaskData":
        """The prompts at `indices`, labelled `split`."""
        index = torch.tensor(indices, dtype=torch.long)
        return TaskData(self.name, self.clean[index], self.patch[index], self.ids[index], self.weights[index],
                        [self.prompts[i] for i in indices], dict(self.skipped), self.note, split)


def single_token(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def keep_single(tokenizer, words: list[str], skipped: dict[str, int]) -> dict[str, int]:
    kept = {}
    for word in words:
        token = single_token(tokenizer, word)
        if token is None:
            skipped[word.strip()] = skipped.get(word.strip(), 0) + 1
        else:
            kept[word] = token
    return kept


def encode(tokenizer, text: str) -> list[int]:
    from training.corpus import bos_eos

    return [bos_eos(tokenizer)[0]] + tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_rows(correct: list[int], incorrect: list[int]) -> tuple[list[int], list[float]]:
    return (correct + incorrect, [1 / len(correct)] * len(correct) + [-1 / len(incorrect)] * len(incorrect))


def assemble(name: str, rows: list[tuple[str, list[int], list[int], list[int], list[float]]], skipped: dict[str, int],
             note: str = "") -> TaskData:
    """rows: (prompt, clean ids, patch ids, answer ids, weights). Keeps the most common length."""
    rows = [r for r in rows if len(r[1]) == len(r[2])]
    if not rows:
        raise TaskError(f"Task {name!r} cannot be expressed with this tokenizer: no prompt survives "
                        f"({sum(skipped.values())} words skipped as several tokens: {', '.join(sorted(skipped)) or '-'}).")
    length = Counter(len(r[1]) for r in rows).most_common(1)[0][0]
    dropped = sum(len(r[1]) != length for r in rows)
    rows = [r for r in rows if len(r[1]) == length]
    if dropped:
        skipped = {**skipped, "prompts of another length": dropped}
    width = max(len(r[3]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    weights = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r[3])] = torch.tensor(r[3])
        weights[i, :len(r[4])] = torch.tensor(r[4])
    return TaskData(name, torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]), ids, weights,
                    [r[0] for r in rows], skipped, note)


def build_ioi(tokenizer, n: int, rng: random.Random) -> TaskData:
    skipped: dict[str, int] = {}
    names = keep_single(tokenizer, NAMES, skipped)
    places = list(keep_single(tokenizer, PLACES, skipped))
    objects = list(keep_single(tokenizer, OBJECTS, skipped))
    if len(names) < 4 or not places or not objects:
        raise TaskError(f"Task 'ioi' cannot be expressed with this tokenizer: only {len(names)} of {len(NAMES)} names "
                        f"are single tokens (need 4) and {len(places)} places, {len(objects)} objects "
                        f"({sum(skipped.values())} words skipped as several tokens).")
    pool = list(names)
    rows = []
    for i in range(n):
        a, b, c, d = rng.sample(pool, 4)  # a = indirect object, b = subject, c, d = fresh names of the corruption
        first = (a, b) if i % 2 == 0 else (b, a)  # ABBA / BABA
        fill = dict(place=rng.choice(places), obj=rng.choice(objects))
        clean = IOI_TEMPLATE.format(A=first[0], B=first[1], S=b, **fill)
        patch = IOI_TEMPLATE.format(A=c, B=d, S=b, **fill)
        rows.append((clean, encode(tokenizer, clean), encode(tokenizer, patch), *answer_rows([names[a]], [names[b]])))
    return assemble("ioi", rows, skipped)


def build_greater_than(tokenizer, n: int, rng: random.Random) -> TaskData:
    skipped: dict[str, int] = {}
    nouns = list(keep_single(tokenizer, GT_NOUNS, skipped))
    if not nouns:
        raise TaskError("Task 'greater_than' cannot be expressed with this tokenizer: no noun is a single token.")
    two_digit = {yy: single_token(tokenizer, f"{yy:02d}") for yy in range(100)}
    whole = all(v is not None for v in two_digit.values())
    digits = {d: single_token(tokenizer, str(d)) for d in range(10)}
    if not whole and any(v is None for v in digits.values()):
        raise TaskError("Task 'greater_than' cannot be expressed with this tokenizer: neither two-digit numbers nor "
                        "single digits are single tokens.")
    note = ("" if whole else "This tokenizer splits numbers into digits: the answer is the tens digit of the end year "
            "(digits above the start year's tens digit are correct, below incorrect, equal is ambiguous).")
    if not whole:
        skipped["two-digit year tokens"] = 100
    rows = []
    for _ in range(n):
        century = rng.choice([11, 12, 13, 14, 15, 16, 17, 18])
        if whole:
            yy = rng.randint(2, 97)
            correct, incorrect = [two_digit[y] for y in range(yy + 1, 100)], [two_digit[y] for y in range(yy)]
        else:
            yy = rng.randint(1, 8) * 10 + rng.randint(0, 9)
            tens = yy // 10
            correct, incorrect = [digits[d] for d in range(tens + 1, 10)], [digits[d] for d in range(tens)]
        noun = rng.choice(nouns)
        clean = GT_TEMPLATE.format(noun=noun, century=century, yy=yy)
        patch = GT_TEMPLATE.format(noun=noun, century=century, yy=1)
        rows.append((clean, encode(tokenizer, clean), encode(tokenizer, patch), *answer_rows(correct, incorrect)))
    return assemble("greater_than", rows, skipped, note)


def build_sva(tokenizer, n: int, rng: random.Random) -> TaskData:
    skipped: dict[str, int] = {}
    pairs = []
    for singular, plural in SVA_NOUNS:
        ids = single_token(tokenizer, singular), single_token(tokenizer, plural)
        if None in ids:
            skipped[f"{singular.strip()}/{plural.strip()}"] = 1
        else:
            pairs.append((singular, plural))
    attractors = list(keep_single(tokenizer, SVA_ATTRACTORS, skipped))
    verbs = [single_token(tokenizer, v) for v in SVA_VERBS]
    if not pairs or not attractors or None in verbs:
        raise TaskError(f"Task 'sva' cannot be expressed with this tokenizer: {len(pairs)} noun pairs, "
                        f"{len(attractors)} attractors and the verbs ' is'/' are' must be single tokens "
                        f"({sum(skipped.values())} words skipped as several tokens).")
    rows = []
    for i in range(n):
        singular, plural = rng.choice(pairs)
        attractor = rng.choice(attractors)
        subject, other = (singular, plural) if i % 2 == 0 else (plural, singular)
        verb, wrong = (verbs[0], verbs[1]) if i % 2 == 0 else (verbs[1], verbs[0])
        clean = SVA_TEMPLATE.format(subject=subject, attractor=attractor)
        patch = SVA_TEMPLATE.format(subject=other, attractor=attractor)
        rows.append((clean, encode(tokenizer, clean), encode(tokenizer, patch), *answer_rows([verb], [wrong])))
    return assemble("sva", rows, skipped)


def task_texts(name: str, seed: int = 1) -> Iterator[str]:
    """An endless stream of the task's prompts with their correct answer, as training text ("task data", e.g.
    "When Mary and John went to the store, John gave a drink to Mary."): the corpus `task:NAME` caches these, so an
    SAE can be trained on the distribution the task's evaluations use. No tokenizer filter: every word list entry
    is used. `seed` 1 by default, so the stream does not begin with the evaluation batches (seed 0)."""
    if name not in TASKS:
        raise TaskError(f"Unknown task {name!r}: choose one of {', '.join(TASKS)}.")
    rng = random.Random(seed)
    for i in itertools.count():
        if name == "ioi":
            a, b = rng.sample(NAMES, 2)  # a = indirect object, b = subject
            first = (a, b) if i % 2 == 0 else (b, a)
            yield IOI_TEMPLATE.format(A=first[0], B=first[1], S=b, place=rng.choice(PLACES),
                                      obj=rng.choice(OBJECTS)) + a + "."
        elif name == "greater_than":
            century, yy = rng.choice(range(11, 19)), rng.randint(1, 97)
            end = rng.randint(yy + 1, 99)
            yield GT_TEMPLATE.format(noun=rng.choice(GT_NOUNS), century=century, yy=yy) + f"{end:02d}."
        else:
            singular, plural = rng.choice(SVA_NOUNS)
            subject, verb = (singular, SVA_VERBS[0]) if i % 2 == 0 else (plural, SVA_VERBS[1])
            yield SVA_TEMPLATE.format(subject=subject, attractor=rng.choice(SVA_ATTRACTORS)) + verb + " here."


def build_task(name: str, tokenizer, n: int = 32, seed: int = 0) -> TaskData:
    """The task's batch of about `n` prompts for this tokenizer (fewer when some have another length)."""
    builders = {"ioi": build_ioi, "greater_than": build_greater_than, "sva": build_sva}
    if name not in builders:
        raise TaskError(f"Unknown task {name!r}: choose one of {', '.join(TASKS)}.")
    if n < 2:
        raise TaskError(f"A task needs at least 2 prompts, got n={n}.")
    return builders[name](tokenizer, n, random.Random(seed))


def split_task(task: TaskData, eval_fraction: float = 0.5, seed: int = 0) -> tuple[TaskData, TaskData]:
    """(discovery, evaluation) parts of `task`, about `eval_fraction` of the prompts held out.

    Identical clean prompts go to the same side, so no held-out prompt was seen in discovery. Prompts are grouped by
    their correct answers, shuffled within a group (seeded) and dealt to the two sides in proportion, so each side
    gets its share of every answer (e.g. as many " is" as " are" prompts in sva)."""
    if not 0 < eval_fraction < 1:
        raise TaskError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}.")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(task.prompts):
        groups.setdefault(prompt, []).append(i)
    rng = random.Random(seed)
    shuffle = {prompt: rng.random() for prompt in groups}

    def answers(i: int) -> tuple[int, ...]:
        return tuple(sorted(task.ids[i][task.weights[i] > 0].tolist()))

    order = sorted(groups, key=lambda p: (answers(groups[p][0]), shuffle[p]))
    discovery, evaluation = [], []
    for j, prompt in enumerate(order):  # systematic sampling: group j is held out when j*f crosses an integer
        (evaluation if int((j + 1) * eval_fraction) > int(j * eval_fraction) else discovery).extend(groups[prompt])
    if not discovery or not evaluation:
        raise TaskError(f"Cannot split {len(groups)} distinct {task.name} prompts with eval_fraction={eval_fraction}: "
                        "build more prompts.")
    return task.subset(sorted(discovery), "discovery"), task.subset(sorted(evaluation), "evaluation")


def build_split(name: str, tokenizer, n_discovery: int = 32, n_eval: int = 32, seed: int = 0
                ) -> tuple[TaskData, TaskData]:
    """A discovery batch of about `n_discovery` prompts and a held-out evaluation batch of about `n_eval` (one
    built batch, split by `split_task`; fewer when prompts repeat or have another length)."""
    if n_discovery < 2 or n_eval < 2:
        raise TaskError(f"A split needs at least 2 prompts on each side, got {n_discovery} and {n_eval}.")
    task = build_task(name, tokenizer, n_discovery + n_eval, seed)
    return split_task(task, n_eval / (n_discovery + n_eval), seed)


def task_metric(logits: Tensor, task: TaskData) -> Tensor:
    """Logit difference (correct - incorrect) at the last position, per prompt. logits: [batch, seq, vocab] -> [batch]."""
    last = logits[:, -1].float()
    return (last.gather(-1, task.ids.to(last.device)) * task.weights.to(last.device)).sum(-1)


@torch.no_grad()
def evaluate_task(model, task: TaskData, min_accuracy: float = 0.6) -> dict:
    """Does the model do the task? Mean logit difference and accuracy (fraction of prompts with difference > 0),
    on clean and patched prompts, with a plain sentence."""
    device = next(model.parameters()).device
    clean = task_metric(model(task.clean.to(device)), task).cpu()
    patch = task_metric(model(task.patch.to(device)), task).cpu()
    mean, accuracy = clean.mean().item(), (clean > 0).float().mean().item()
    does = mean > 0 and accuracy >= min_accuracy
    if does:
        sentence = (f"The model does {task.name}: mean logit difference {mean:.3f} (correct - incorrect), "
                    f"accuracy {accuracy:.0%} on {len(task)} prompts.")
    else:
        sentence = (f"The model does NOT do {task.name}: mean logit difference {mean:.3f}, accuracy {accuracy:.0%} "
                    f"on {len(task)} prompts (needs > 0 and >= {min_accuracy:.0%}); a circuit for it explains noise.")
    return {"task": task.name, "n_prompts": len(task), "mean_logit_diff": mean, "accuracy": accuracy,
            "mean_logit_diff_patch": patch.mean().item(), "does_task": bool(does), "message": sentence,
            "skipped": dict(task.skipped), "n_skipped": task.n_skipped, "note": task.note}
