"""Structured outputs: generation constrained to a JSON schema, any JSON object, a regular
expression, one of a list of choices, or an EBNF grammar, with xgrammar.

Why xgrammar (measured here against llguidance 1.9.1 on the test tokenizer, one nested schema,
``benchmarks/serve.py`` has the engine-level cost): per-step mask 44 us at 512 tokens and 72 us at
4,096 (llguidance 126 and 188 us), schema compile 2-9 ms (llguidance 6 ms), the tokenizer's table
1.4-24 ms (llguidance 5-47 ms); both take the tokenizer's JSON, both bound JSON whitespace.
xgrammar is also vLLM's default backend, so its grammar dialect (GBNF-like EBNF, ECMAScript
regular expressions) is the one vLLM users write.

``StructuredOutputs`` is the request's constraint (vLLM's ``structured_outputs`` fields). A
``GrammarCompiler`` belongs to one tokenizer; it compiles each distinct constraint once and keeps
it (``compile``). Per sequence, ``GrammarMask`` is a logits processor of the sampling chain: it
fills the row's token bitmask from its matcher and sets every token the grammar forbids to -inf,
and advances the matcher on each appended token. Its ``reset`` replays the sequence's generated
ids into a fresh matcher, so a rollback (a loop break) rolls the grammar back with the ids.
Once the grammar is complete only the sequence's end ids are allowed, so a constrained answer
ends as soon as it is whole.

Whitespace: a JSON grammar that allows any whitespace lets a weak model run on in spaces and
newlines until ``max_tokens``. ``strict`` (the default) allows none between JSON tokens (compact
JSON, as OpenAI's strict mode writes it); non-strict allows runs of at most
``MAX_JSON_WHITESPACE`` characters.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from arlm.devices import pinned_to
from arlm.sampling.processors import History, Processor

STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_JSON_WHITESPACE = 4  # characters of whitespace in a row that non-strict JSON allows
MAX_CACHED_GRAMMARS = 256  # compiled constraints kept per tokenizer, least recently used first
MAX_CONSTRAINT_CHARS = 1 << 20  # a schema, regex or grammar longer than this is refused
MAX_CHOICES = 1024

# xgrammar's messages start with a timestamp and the C++ source line
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: \([^)]*\) is false:\s*)?")


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a generation, exactly one of: ``json`` (a JSON schema, as a dict or
    its text), ``regex``, ``choice`` (the output is one of these strings), ``grammar`` (EBNF, in
    xgrammar's GBNF-like dialect) or ``json_object`` (any JSON object). ``strict``: JSON without
    whitespace between tokens, and a schema's objects without properties it does not name
    (False: bounded whitespace, and extra properties where the schema does not forbid them)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    strict: bool = True

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs gives {', '.join(given) or 'no constraint'}; give exactly "
                f"one of {', '.join(STRUCTURED_KINDS)}"
            )
        if not isinstance(self.strict, bool) or not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.strict and .json_object must be true or false")
        kind = given[0]
        if kind == "json" and not isinstance(self.json, dict | str):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or text)")
        if kind in ("regex", "grammar") and not isinstance(getattr(self, kind), str):
            raise ValueError(f"structured_outputs.{kind} must be a string")
        if kind == "choice":
            choice = self.choice
            if (
                not isinstance(choice, list | tuple)
                or not choice
                or len(choice) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in choice)
            ):
                raise ValueError(
                    f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} non-empty "
                    "strings"
                )
            object.__setattr__(self, "choice", tuple(choice))
        if len(self.source) > MAX_CONSTRAINT_CHARS:
            raise ValueError(
                f"structured_outputs.{kind} is {len(self.source)} characters; at most "
                f"{MAX_CONSTRAINT_CHARS} are allowed"
            )

    @classmethod
    def from_value(cls, value: StructuredOutputs | dict) -> StructuredOutputs:
        """From a ``StructuredOutputs`` or a dict of its fields, naming unknown ones."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"structured_outputs={value!r} is not allowed; it must be a StructuredOutputs "
                "or a dict of its fields"
            )
        known = [*STRUCTURED_KINDS, "strict"]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"structured_outputs has unknown fields {unknown}; allowed: {known}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def source(self) -> str:
        """The constraint as text: the cache's key with ``kind`` and ``strict``."""
        kind = self.kind
        if kind == "json" and isinstance(self.json, str):
            return self.json
        if kind == "json":
            return json.dumps(self.json)  # property order is the order generated
        if kind == "choice":
            return json.dumps(list(self.choice))
        if kind == "json_object":
            return ""
        return getattr(self, kind)


def _vocab_type(tokenizer_json: dict):
    """xgrammar's name for how the tokenizer writes bytes in its vocabulary."""
    import xgrammar as xgr

    decoder = tokenizer_json.get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL  # GPT-2's printable stand-ins for bytes
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK  # SentencePiece's <0x0A> and U+2581 for a space
    return xgr.VocabType.RAW


class GrammarCompiler:
    """Compiles constraints for one tokenizer and a model's vocabulary of ``vocab_size`` ids
    (it may pad the tokenizer's); thread-safe, each distinct constraint compiled once."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr  # the grammar library is loaded by the first constrained request

        self._xgr = xgr
        spec = json.loads(tokenizer.to_json())
        # the bitmask covers the model's ids and the tokenizer's (either may have more)
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        vocab = [tokenizer.id_to_token(i) or "" for i in range(tokenizer.vocab_size)]
        prefix_space = (spec.get("pre_tokenizer") or {}).get("add_prefix_space", False)
        info = xgr.TokenizerInfo(
            vocab,
            _vocab_type(spec),
            vocab_size=self.vocab_size,
            stop_token_ids=list(tokenizer.eos_token_ids) or None,
            add_prefix_space=bool(prefix_space),
        )
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        # xgrammar's JSON strings admit raw control characters (U+0001..U+001F but \n, \r),
        # which JSON forbids and json.loads refuses: tokens holding one are ruled out for JSON,
        # all of them in strict mode, all but tab, newline and carriage return otherwise
        controls = [[b < 0x20 for b in raw] for raw in info.decoded_vocab]
        pad = [False] * (self.vocab_size - len(controls))
        self._json_bans = {
            True: torch.tensor([any(c) for c in controls] + pad),
            False: torch.tensor(
                [
                    any(c and b not in b"\t\n\r" for c, b in zip(cs, raw, strict=True))
                    for cs, raw in zip(controls, info.decoded_vocab, strict=True)
                ]
                + pad
            ),
        }
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputs):
        """``spec`` compiled (from the cache when seen before); ``ValueError`` naming the
        field for a schema, regex or grammar the library refuses."""
        key = (spec.kind, spec.source, spec.strict)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "a JSON schema", "regex": "a regular expression"}.get(
                spec.kind, "an EBNF grammar"
            )
            reason = _NATIVE_PREFIX.sub("", str(e).strip()).strip()
            raise ValueError(
                f"structured_outputs.{spec.kind} is not {what} this server can use: {reason}"
            ) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputs):
        c = self._compiler
        whitespace = (
            {"any_whitespace": False}
            if spec.strict
            else {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
        )
        if spec.kind == "json":
            return c.compile_json_schema(spec.source, strict_mode=spec.strict, **whitespace)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
        if spec.kind == "regex":
            return c.compile_regex(spec.regex)
        if spec.kind == "choice":
            # each choice a JSON string literal, which EBNF's literals read the same way
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in spec.choice))
        return c.compile_grammar(spec.grammar)

    def mask(self, spec: StructuredOutputs, end_ids) -> GrammarMask:
        """A fresh ``GrammarMask`` for one sequence, ending on ``end_ids``."""
        banned = self._json_bans[spec.strict] if spec.kind in ("json", "json_object") else None
        return GrammarMask(self._xgr, self.compile(spec), self.vocab_size, end_ids, banned)


class GrammarMask(Processor):
    """One sequence's grammar as a logits processor (see the module's doc)."""

    def __init__(
        self, xgr, compiled, vocab_size: int, end_ids, banned: torch.Tensor | None = None
    ) -> None:
        ends = sorted(end_ids)
        if not ends:
            raise ValueError(
                "structured outputs need an end token to finish on; ignore_eos is not allowed "
                "with them unless stop_token_ids names one"
            )
        self._xgr, self.vocab_size = xgr, vocab_size
        self._compiled, self._ends, self._banned = compiled, ends, banned
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._banned_on: torch.Tensor | None = None  # ``banned`` on the logits' device
        self.matcher = None

    def reset(self, history: History) -> None:
        self.matcher = self._xgr.GrammarMatcher(self._compiled, override_stop_tokens=self._ends)
        ids, prompt_len = history.rows[0], history.prompt_lens[0]
        for token in ids[prompt_len:]:
            self._accept(token)

    def append(self, history: History) -> None:
        self._accept(history.rows[0][-1])

    def _accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            # the mask allowed only tokens the grammar accepts; this one came from elsewhere
            raise ValueError(f"token {token} does not fit the structured-output grammar here")

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self._bitmask)
        # xgrammar's bitmask is in pageable memory, and a copy from there (non_blocking or
        # not) waits for the device: copied through pinned memory, it joins the stream's queue
        bitmask = pinned_to(self._bitmask, logits.device)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.size(-1))
        if self._banned is not None:
            if self._banned_on is None or self._banned_on.device != logits.device:
                self._banned_on = pinned_to(self._banned, logits.device)  # once per sequence
            logits.masked_fill_(self._banned_on[: logits.size(-1)], float("-inf"))
        return logits
