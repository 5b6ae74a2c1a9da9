"""Structured output: the grammars a request's answer must follow, compiled and matched by xgrammar.

A request names its grammar by a plain spec string (`SamplingParams.grammar`): `json` (any JSON
object, the chat API's `json_object`), `schema:<JSON Schema>` (its `json_schema`) or
`tagged:{"open", "schema", "close"}` (JSON between two fixed texts: `tool_choice` `required` or a
named function, one tool-call block of `api/tools.py`). `Grammars` compiles a spec once (the last
`CACHED` specs are kept; the API compiles first, off the event loop, so a bad schema is a 400 before
the request reaches the engine) and makes one `Matcher` per sequence: the
runner asks it which tokens may come next (a packed bit mask: bit t of word t // 32) and tells it
the token that came. Once the grammar is complete only a stop token is allowed, and the engine ends
the answer when it comes (`ended`), `ignore_eos` or not. The JSON's whitespace is fixed (xgrammar's
`any_whitespace=False`: `", "` and `": "` separators, no other blanks), so a weak model cannot spend
its budget on blanks.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

CACHED = 256  # compiled grammars kept (a JSON Schema's is ~tens of KB)


class GrammarError(ValueError):
    """The spec cannot be compiled (an invalid or unsupported schema)."""


class Grammars:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, object] = OrderedDict()  # spec -> xgrammar CompiledGrammar

    @staticmethod
    def available() -> bool:
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            return False
        return True

    def _xgr(self):
        import xgrammar as xgr

        with self._lock:  # the tokenizer table takes ~0.5 s: built on first use, once
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return xgr

    def compile(self, spec: str):
        with self._lock:
            got = self._compiled.get(spec)
            if got is not None:
                self._compiled.move_to_end(spec)
                return got
        got = self._compile(spec)
        with self._lock:
            self._compiled[spec] = got
            while len(self._compiled) > CACHED:
                self._compiled.popitem(last=False)
        return got

    def _compile(self, spec: str):
        xgr = self._xgr()
        try:
            if spec == "json":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.startswith("schema:"):
                return self._compiler.compile_json_schema(spec[len("schema:") :], any_whitespace=False)
            if spec.startswith("tagged:"):
                t = json.loads(spec[len("tagged:") :])
                body = xgr.Grammar.from_json_schema(json.dumps(t["schema"]), any_whitespace=False)
                text = lambda x: xgr.Grammar.from_ebnf(f"root ::= {json.dumps(x)}")  # noqa: E731
                return self._compiler.compile_grammar(
                    xgr.Grammar.concat(text(t["open"]), body, text(t["close"]))
                )
        except RuntimeError as e:  # xgrammar reports schema errors as RuntimeError with a C++ trace
            raise GrammarError(_last_line(str(e))) from None
        raise GrammarError(f"unknown grammar spec {spec[:40]!r}")

    def matcher(self, spec: str) -> Matcher:
        xgr = self._xgr()
        return Matcher(xgr.GrammarMatcher(self.compile(spec)), xgr, self.vocab_size)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, m, xgr, vocab_size: int) -> None:
        self._m, self._bits = m, xgr.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> torch.Tensor:
        """[ceil(V / 32)] int32: bit t of word t // 32 set if token t may come next (a fresh tensor)."""
        self._m.fill_next_token_bitmask(self._bits, 0)
        return self._bits[0].clone()

    def accept(self, token: int) -> bool:
        return self._m.accept_token(token)

    @property
    def ended(self) -> bool:
        return self._m.is_terminated()


def tagged_spec(open_tag: str, schema: dict, close_tag: str) -> str:
    """JSON that fits `schema` between two fixed texts (a tool call between its tags)."""
    return "tagged:" + json.dumps(
        {"open": open_tag, "schema": schema, "close": close_tag}, separators=(",", ":")
    )


def schema_spec(schema: dict) -> str:
    return "schema:" + json.dumps(schema, separators=(",", ":"))  # key order kept: it is the output's


def _last_line(msg: str) -> str:
    lines = [x.strip() for x in msg.strip().splitlines() if x.strip()]
    text = lines[-1] if lines else msg
    text = text.split("Check failed: (error.empty()) is false: ")[-1]
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)[:300]  # no "[time] file.cc:line: "
