"""Tokenise rendered pairs as TRL's DPOTrainer does (the joint tokenisation), then truncate them."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.data.badrows import BadRow, _apply_policy, _check_policy
from prefcache.data.options import TRUNCATIONS
from prefcache.data.validate import Example


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. The model sees ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``,
    each at most ``max_length`` long; ``*_truncated``: that side's untruncated sequence was longer."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_truncated: bool
    rejected_truncated: bool


def _common_prefix(a: list[int], b: list[int]) -> int:
    if a == b[: len(a)]:
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, truncation: str):
    """Cut one pair to ``max_length`` tokens per sequence, keeping a single shared prompt."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    if truncation == "keep_end":
        # The prompt loses its head, only as far as the longer completion needs, but keeps at least
        # half the window (or all of itself when shorter): a completion scored with no context is noise.
        kept = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - kept :]
    room = max_length - len(prompt)  # >= 1: keep_start prompts are < max_length, keep_end's are cut above
    return prompt, chosen[:room], rejected[:room]


def check_length_options(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a completion token), got {max_length}")


def tokenize_examples(examples: list[Example], tokenizer, max_length: int, truncation: str = "keep_start",
                      on_bad_row: str = "fail") -> tuple[list[TokenizedPair], list[BadRow]]:
    """Tokenise pairs as TRL's DPOTrainer does, then truncate.

    ``prompt_ids = tok(prompt)``, ``full = tok(prompt + completion)`` (the tokenizer's defaults for
    standard text; for chat-rendered text no special tokens are added, as ``apply_chat_template``
    tokenises, since the template already wrote them). BPE can merge across the boundary, so the prompt
    part is the common prefix of ``prompt_ids`` and ``full``, the shorter over chosen and rejected; the
    rest of each ``full`` is the completion. So ``prompt_ids + chosen_ids`` is exactly ``tok(prompt + chosen)``.

    Truncation, per sequence of at most ``max_length`` tokens:
    - ``keep_start`` (TRL's default, matched exactly): keep the first ``max_length`` tokens; the prompt is
      never cut, a long completion loses its tail (EOS included). A prompt of ``>= max_length`` tokens
      leaves no room for a completion: a bad row.
    - ``keep_end``: the prompt loses its *head* instead, just enough for the longer completion to fit,
      so both sides keep one shared prompt (TRL cuts each sequence on its own, which gives chosen and
      rejected different prompts). The prompt keeps at least ``min(its length, max_length // 2)``
      tokens; a completion that still does not fit loses its tail, so each sequence stays one contiguous
      text. Long prompts are therefore not bad rows here. This is TRL 0.x's keep_end with
      ``max_prompt_length = max_length // 2``, cutting the prompt only as far as needed.
    ``*_truncated`` is True when that side's untruncated prompt + completion exceeded ``max_length`` (under
    keep_end the shorter side may lose prompt tokens to the longer one without being flagged).
    """
    _check_policy(on_bad_row)
    check_length_options(max_length, truncation)
    ids: list[tuple[list[int], list[int], list[int]] | None] = [None] * len(examples)
    for chat in (False, True):
        idx = [i for i, ex in enumerate(examples) if ex.conversational == chat]
        if not idx:
            continue
        texts = [examples[i].prompt for i in idx]
        texts += [examples[i].prompt + examples[i].chosen for i in idx]
        texts += [examples[i].prompt + examples[i].rejected for i in idx]
        # One batched call: the fast tokenizer encodes the batch in Rust, ~100x a per-row loop.
        enc = tokenizer(texts, add_special_tokens=not chat, verbose=False)["input_ids"]
        n = len(idx)
        for k, i in enumerate(idx):
            ids[i] = (enc[k], enc[n + k], enc[2 * n + k])
    pairs, bad = [], []
    for ex, (prompt_ids, full_c, full_r) in zip(examples, ids, strict=True):
        p = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
        chosen, rejected = full_c[p:], full_r[p:]
        problem = pair_problem(p, chosen, rejected, max_length, truncation,
                               "the prompt has no tokens of its own (it is empty, or merges into the completion's "
                               "first token)")
        if problem:
            bad.append(BadRow(ex.row, ex.id, problem))
            continue
        prompt = full_c[:p]
        kept = _truncate(prompt, chosen, rejected, max_length, truncation)
        pairs.append(TokenizedPair(ex.id, *kept, p + len(chosen) > max_length, p + len(rejected) > max_length))
    _apply_policy(bad, on_bad_row)
    return pairs, bad


def pair_problem(p: int, chosen: list[int], rejected: list[int], max_length: int, truncation: str, empty_prompt: str,
                 prompt_tokens: str = "tokens", no_room: str = "") -> str | None:
    """Why a tokenised pair with a ``p``-token prompt cannot be scored (its bad row's reason), or None.
    ``empty_prompt``, ``prompt_tokens`` and ``no_room``: the wording of a kind of pair (a vision pair's prompt
    counts its image tokens, which are never cut)."""
    if p == 0:
        return empty_prompt
    if not chosen or not rejected:
        return f"empty completion '{'chosen' if not chosen else 'rejected'}' after tokenisation"
    if truncation == "keep_start" and p >= max_length:
        return f"the prompt alone has {p} {prompt_tokens}, max_length is {max_length}: no room for a completion{no_room}"
    return None
