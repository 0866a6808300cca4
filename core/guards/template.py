"""Template lint: the chat template and the label mask, checked on rows formatted exactly as in training.

* the tokenizer has a chat template when the data is conversational (else: a clear choice);
* rendering is prefix-preserving across turns (each turn renders the same once later turns follow);
* the end-of-turn token is in the trained labels after collation (else generations do not stop),
  and the model's ``generation_config`` stops on it;
* the prompt the model sees at inference (``chat.prompt_text``) is token for token the prefix it
  was trained after.
"""

from __future__ import annotations

from typing import Any, Callable

from lft.data import chat
from lft.errors import DataError
from lft.guards.findings import Finding
from lft.losses.logprobs import IGNORE_INDEX
from lft.objective import RowTexts

PROBE = [
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def is_conversational(row: dict) -> bool:
    """A row with a list of messages in any column."""
    return any(_is_messages(v) for v in row.values())


def pairs(feature: dict) -> list[tuple[str, list[int], list[int] | None]]:
    """``(prefix, input_ids, labels)`` for every ``*input_ids`` key of a formatted example."""
    out = []
    for key, ids in feature.items():
        if key.endswith("input_ids") and isinstance(ids, list):
            prefix = key[: -len("input_ids")]
            labels = feature.get(prefix + "labels")
            out.append((prefix.rstrip("_"), ids, labels if isinstance(labels, list) else None))
    return out


def format_sample(rows: Any, hook: Any, tokenizer: Any, config: Any, limit: int) -> tuple[list[tuple], list[str]]:
    """Format the first ``limit`` rows through ``lft_format_example``: ``[(row, where, feature)]``
    and the errors of rows that failed (as ``where: message``)."""
    formatted, errors = [], []
    for row, where in list(zip(rows.rows, rows.where))[:limit]:
        try:
            feature = hook.lft_format_example(example=row, tokenizer=tokenizer, config=config)
        except (DataError, KeyError, TypeError, ValueError) as exc:
            errors.append(f"{where}: {exc}")
            continue
        if feature is None or "skip" in feature:
            continue
        formatted.append((row, where, dict(feature)))
    return formatted, errors


def _messages(row: dict) -> list[dict] | None:
    """The row's whole conversation: its one column of messages (None when it has none or several)."""
    found = [v for v in row.values() if _is_messages(v)]
    if len(found) != 1:
        return None
    try:
        return chat.check_messages(found[0])
    except DataError:
        return None


def _diverge(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{a[max(0, i - 30) : i + 30]!r} vs {b[max(0, i - 30) : i + 30]!r}"


def prefix_problem(tokenizer: Any, messages: list[dict]) -> str | None:
    """Why rendering ``messages`` turn by turn is not prefix-preserving, or None when it is."""
    try:
        full = chat.render(tokenizer, messages)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not i:
                continue
            before = chat.render(tokenizer, messages[:i], add_generation_prompt=True)
            upto = chat.render(tokenizer, messages[: i + 1])
            if not upto.startswith(before):
                return f"the generation prompt is not how turn {i + 1} starts once rendered: {_diverge(before, upto)}"
            if not full.startswith(upto):
                return f"turn {i + 1} renders differently once later turns follow: {_diverge(upto, full)}"
    except Exception as exc:  # jinja raises its own errors (e.g. roles must alternate)
        return f"the template fails on a plain two-exchange conversation ({type(exc).__name__}: {exc})"
    return None


def template_choices(tokenizer: Any, config: Any, objective: str) -> str:
    """The message that offers a template to a tokenizer without one."""
    field = type(config).model_fields.get(objective)
    section = field.annotation if field is not None else None
    key = f"{objective}.chat_template" if section is not None and "chat_template" in section.model_fields else None
    specials = set(tokenizer.all_special_tokens or [])
    chatml_ok = {"<|im_start|>", "<|im_end|>"} <= specials
    options = [
        f"chatml{' (this tokenizer has <|im_start|> and <|im_end|>)' if chatml_ok else ''}",
        f"simple (User:/Assistant: turns, each answer ending with the eos token {tokenizer.eos_token!r})",
    ]
    if not chatml_ok:
        options.reverse()
    how = (
        f"set {key}=NAME with NAME one of: {'; '.join(options)}; or give a Jinja template"
        if key
        else "set a chat template on the tokenizer"
    )
    return (
        "the tokenizer has no chat template (a base model?) but the data is conversational; "
        + how
        + "; or use plain 'text' / 'prompt'+'completion' rows"
    )


def _stop_ids(generation_config: Any) -> set[int] | None:
    if generation_config is None:
        return None
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def check_template(
    tokenizer: Any,
    rows: Any,
    hook: Any,
    config: Any,
    objective: str,
    limit: int = 64,
    generation_config: Any = None,
    row_texts: Callable[[dict], RowTexts] | None = None,
) -> Finding:
    """Lint the chat template and the label masks on the first ``limit`` rows of ``rows``;
    ``row_texts`` (the objective's) names the prompts each row's answers follow."""
    finding = Finding("template")
    sample, errors = format_sample(rows, hook, tokenizer, config, limit)  # applies the objective's template option
    conversational = sum(is_conversational(r) for r in rows.rows[:limit])
    if conversational and not chat.has_chat_template(tokenizer):
        finding.detail = "no chat template"
        return finding.raise_to("error", template_choices(tokenizer, config, objective))
    multi_turn = [
        m for m in (_messages(r) for r in rows.rows[:limit]) if m and sum(x["role"] == "assistant" for x in m) > 1
    ]
    if chat.has_chat_template(tokenizer):
        problem = next((p for p in (prefix_problem(tokenizer, m) for m in multi_turn[:8]) if p), None)
        if problem:
            finding.raise_to(
                "error", f"the chat template is not prefix-preserving, so turns cannot be masked: {problem}"
            )
        elif prefix_problem(tokenizer, PROBE):
            finding.raise_to(
                "info",
                "the chat template is not prefix-preserving on a two-exchange conversation "
                f"({prefix_problem(tokenizer, PROBE)}); multi-turn rows would fail to format",
            )
    finding.data["unformatted"] = len(errors)  # the formatting itself reports bad rows, with its own message
    if not sample:
        finding.detail = "no row could be formatted"
        return finding
    _check_end_of_turn(finding, tokenizer, hook, config, sample, _stop_ids(generation_config))
    _check_prompts(finding, tokenizer, sample, row_texts)
    finding.detail = finding.detail or f"{len(sample)} rows checked" + (
        ", chat template" if chat.has_chat_template(tokenizer) else ""
    )
    return finding


def _check_end_of_turn(
    finding: Finding, tokenizer: Any, hook: Any, config: Any, sample: list[tuple], stop_ids: set[int] | None
) -> None:
    eot = chat.end_of_turn_ids(tokenizer)
    features = [{k: v for k, v in f.items() if k != "truncated"} for _, _, f in sample]
    truncated = [bool(f.get("truncated")) for _, _, f in sample]
    missing, checked, trained_eot = [], 0, set()
    for index, feature in enumerate(features):  # one at a time: a row may collate into several sequences
        if truncated[index]:
            continue
        batch = hook.lft_collate(features=[feature], tokenizer=tokenizer, config=config)
        for key, labels in (batch or {}).items():
            if not key.endswith("labels") or not hasattr(labels, "shape") or labels.dim() != 2:
                continue
            for row in labels:
                trained = {int(t) for t in row[row != IGNORE_INDEX].tolist()}
                if not trained:
                    continue
                checked += 1
                found = trained & eot
                trained_eot |= found
                if not found:
                    missing.append(sample[index][1])
    if missing:
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(eot)) or "none known"
        finding.raise_to(
            "warning",
            f"{len(missing)} of {checked} examples have no end-of-turn token ({names}) in their "
            f"trained labels, so the model never learns to stop and generations run on; e.g. {missing[0]}",
        )
        finding.examples.extend(missing[:3])
    if stop_ids is not None and trained_eot and not (trained_eot & stop_ids):
        tokens = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in sorted(trained_eot))
        finding.raise_to(
            "warning",
            f"the model's generation_config stops on ids {sorted(stop_ids)} but the trained "
            f"end-of-turn token is {tokens}; tools that read generation_config will not stop (set its "
            "eos_token_id)",
        )
    finding.data.update(eot_checked=checked, eot_missing=len(missing))


def _check_prompts(
    finding: Finding, tokenizer: Any, sample: list[tuple], row_texts: Callable[[dict], RowTexts] | None
) -> None:
    """The inference prompt must be, token for token, the prefix the answer was trained after."""
    mismatches, headers, checked = [], [], 0
    for row, where, feature in sample:
        candidates = row_texts(row).prompts if row_texts else []
        for _, ids, labels in pairs(feature):
            if not candidates or labels is None:
                continue
            first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
            if not first:
                continue  # everything trained (no prompt), or nothing
            trained_after = list(ids[:first])
            checked += 1
            header = _trained_header(tokenizer, row, ids, labels, first)
            if header:
                headers.append((where, header))
            rendered = []
            for prompt in candidates:
                text = chat.prompt_text(tokenizer, prompt)
                rendered.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
            if trained_after not in rendered:
                best = max(rendered, key=lambda r: _common(r, trained_after))
                mismatches.append((where, trained_after, best))
            break  # one pair per row is enough (chosen and rejected share the prompt)
    if mismatches:
        where, train_ids, infer_ids = mismatches[0]
        k = _common(train_ids, infer_ids)

        def show(ids: list[int]) -> str:
            return repr(tokenizer.decode(ids[max(0, k - 3) : k + 12], skip_special_tokens=False))

        finding.raise_to(
            "warning",
            f"{len(mismatches)} of {checked} rows: the prompt used at inference differs from "
            f"the prefix trained on (from token {k}: training {show(train_ids)}, inference "
            f"{show(infer_ids)}); e.g. {where}",
        )
        finding.examples.extend(m[0] for m in mismatches[:3])
    if headers:
        where, header = headers[0]
        finding.raise_to(
            "warning",
            f"{len(headers)} of {checked} rows train {header!r} before the assistant's words: "
            "the template's generation prompt (add_generation_prompt) lacks the assistant header, so "
            f"the model must write it itself and answers start with it; e.g. {where}",
        )
        finding.examples.extend(h[0] for h in headers[:3] if h[0] not in finding.examples)
    finding.data.update(prompts_checked=checked, prompt_mismatches=len(mismatches), trained_headers=len(headers))


def _trained_header(tokenizer: Any, row: dict, ids: list[int], labels: list[int], first: int) -> str | None:
    """Text trained before the first assistant message's content (a role header the template puts
    in the answer), or None."""
    messages = row.get("messages")
    answer = next(
        (m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "assistant"), None
    )
    if not isinstance(answer, str) or not answer.strip():
        return None
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    trained = tokenizer.decode(ids[first:end], skip_special_tokens=False)
    position = trained.find(answer.strip()[:20])
    head = trained[:position] if position > 0 else ""
    return head if head.strip() else None


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
