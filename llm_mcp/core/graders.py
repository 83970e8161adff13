"""Graders: how a generation is scored, declared in a request, no code. One table, `GRADERS`.

    exact_match  1 if the completion equals the row's `field` (default 'answer') after trimming and
                 collapsing whitespace (ignore_case: also letter case)
    contains     1 if the completion contains the row's `field` (or the grader's own `text`)
    regex        1 if `pattern` (or the row's `field`, default 'regex') matches (full: the whole completion)
    json_fields  the share of `fields` whose values in the first JSON object of the completion equal the row's
                 `field` object (default 'json'); 0 if no object parses
    numeric      1 if the completion's last number equals the row's `field` (default 'answer') within `tolerance`
    length       1 inside [min_chars, max_chars]; outside, falls linearly to 0 at twice the distance
    http         the user's grader: a batch of {prompt, completion, row} posted to `url` (loopback, or a URL the
                 operator lists in LLM_MCP_REWARD_URLS) that answers {"scores": [...]} (llm_mcp.core.reward_http)
    agent        the calling agent: the job shows its completions and waits for submit_rewards

A request's graders combine as the weighted sum of their scores (weights may be negative: a penalty).
Imports no torch: validation, GRPO jobs and evaluate all use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_mcp.core.reward_http import url_problem

GraderName = Literal["exact_match", "contains", "regex", "json_fields", "numeric", "length", "http", "agent"]
MAX_PATTERN = 500  # characters of a regular expression (Python's re has no time limit; completions are bounded)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


class GraderSpec(BaseModel):
    """One grader of a request: its name, weight and the settings that grader takes (see `GRADERS`)."""

    model_config = ConfigDict(extra="forbid")

    grader: GraderName = Field(description="Which grader (llm_mcp.core.graders).")
    weight: float = Field(1.0, ge=-100, le=100, description="Its weight in the summed reward (negative: a penalty).")
    name: str | None = Field(None, pattern=r"^[\w.-]{1,40}$", description="Its label in metrics (default: grader).")
    field: str | None = Field(None, max_length=64, description="The row's key holding the reference.")
    text: str | None = Field(None, max_length=2000, description="contains: a fixed text instead of a row's field.")
    pattern: str | None = Field(None, max_length=MAX_PATTERN, description="regex: the pattern.")
    full: bool = Field(False, description="regex: the whole completion must match.")
    ignore_case: bool = Field(False, description="exact_match / contains: ignore letter case.")
    fields: list[str] | None = Field(None, max_length=32, description="json_fields: the keys compared.")
    tolerance: float = Field(1e-6, ge=0, le=1e12, description="numeric: the allowed absolute difference.")
    min_chars: int | None = Field(None, ge=0, le=1_000_000, description="length: the shortest completion kept at 1.")
    max_chars: int | None = Field(None, ge=1, le=1_000_000, description="length: the longest completion kept at 1.")
    url: str | None = Field(None, max_length=2000, description="http: where the batch is posted.")
    timeout_s: float = Field(30, ge=1, le=300, description="http: the whole call's limit in seconds.")
    instructions: str | None = Field(None, max_length=4000, description="agent: what the judge scores for.")
    wait_s: float = Field(1800, ge=10, le=604800, description="agent: how long a step waits before pausing.")

    @property
    def label(self) -> str:
        return self.name or self.grader


class Grader:
    """One grader: the settings it takes, their checks, and its score of one completion."""

    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()  # GraderSpec fields it reads (besides grader, weight, name)
    default_field: ClassVar[str | None] = None
    batch: ClassVar[bool] = False  # True: scored outside this process (http, agent), a batch at a time

    def check(self, spec: GraderSpec, where: str, problems: list[str]) -> None:
        """Problems with this grader's own settings."""

    def reference(self, spec: GraderSpec, row: dict[str, Any]) -> Any:
        """The row's reference this grader compares with.

        Raises:
            ValueError: the row lacks it.
        """
        key = spec.field or self.default_field
        if key is None:
            return None
        if key not in row or row[key] is None:
            raise ValueError(
                f"grader {spec.label!r} reads the row's {key!r}, which this row lacks (keys {sorted(row)[:8]})"
            )
        return row[key]

    def score(self, spec: GraderSpec, completion: str, row: dict[str, Any]) -> float:
        raise NotImplementedError


def _norm(text: str, ignore_case: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


class ExactMatch(Grader):
    name = "exact_match"
    settings = ("field", "ignore_case")
    default_field = "answer"

    def score(self, spec, completion, row):
        return float(_norm(completion, spec.ignore_case) == _norm(str(self.reference(spec, row)), spec.ignore_case))


class Contains(Grader):
    name = "contains"
    settings = ("field", "text", "ignore_case")
    default_field = "answer"

    def reference(self, spec, row):
        return spec.text if spec.text is not None else super().reference(spec, row)

    def score(self, spec, completion, row):
        return float(_norm(str(self.reference(spec, row)), spec.ignore_case) in _norm(completion, spec.ignore_case))


def compile_pattern(pattern: Any, where: str) -> re.Pattern[str]:
    """The compiled pattern. Raises ValueError naming `where`, the pattern and what to do."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise ValueError(
            f"{where}={str(pattern)[:80]!r} must be a regular expression of at most {MAX_PATTERN} characters"
        )
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}={pattern!r} is not a valid regular expression ({exc}); fix it") from None


class Regex(Grader):
    name = "regex"
    settings = ("pattern", "field", "full")

    def check(self, spec, where, problems):
        if spec.pattern is not None:
            try:
                compile_pattern(spec.pattern, f"{where}.pattern")
            except ValueError as exc:
                problems.append(str(exc))

    def reference(self, spec, row):
        if spec.pattern is not None:
            return spec.pattern
        return super().reference(spec.model_copy(update={"field": spec.field or "regex"}), row)

    def score(self, spec, completion, row):
        pattern = compile_pattern(self.reference(spec, row), f"the row's {spec.field or 'regex'!r}")
        return float(
            (pattern.fullmatch if spec.full else pattern.search)(completion.strip() if spec.full else completion)
            is not None
        )


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (inside a code fence or not), or None."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                value, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


class JsonFields(Grader):
    name = "json_fields"
    settings = ("fields", "field")
    default_field = "json"

    def check(self, spec, where, problems):
        if not spec.fields:
            problems.append(f"{where}.fields is required for json_fields: the keys to compare, e.g. ['name', 'age']")

    def reference(self, spec, row):
        ref = super().reference(spec, row)
        if isinstance(ref, str):
            try:
                ref = json.loads(ref)
            except ValueError:
                ref = None
        if not isinstance(ref, dict):
            raise ValueError(f"grader {spec.label!r}: the row's {spec.field or 'json'!r} is not a JSON object")
        return ref

    def score(self, spec, completion, row):
        ref, got = self.reference(spec, row), first_json_object(completion)
        keys = spec.fields or []
        if got is None or not keys:
            return 0.0
        return sum(k in got and k in ref and got[k] == ref[k] for k in keys) / len(keys)


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class Numeric(Grader):
    name = "numeric"
    settings = ("field", "tolerance")
    default_field = "answer"

    def reference(self, spec, row):
        ref = super().reference(spec, row)
        value = ref if isinstance(ref, int | float) and not isinstance(ref, bool) else last_number(str(ref))
        if value is None or not math.isfinite(value):
            raise ValueError(f"grader {spec.label!r}: the row's {spec.field or 'answer'!r}={ref!r} is not a number")
        return float(value)

    def score(self, spec, completion, row):
        got = last_number(completion)
        return float(got is not None and abs(got - self.reference(spec, row)) <= spec.tolerance)


class Length(Grader):
    name = "length"
    settings = ("min_chars", "max_chars")

    def check(self, spec, where, problems):
        if spec.min_chars is None and spec.max_chars is None:
            problems.append(f"{where}: length needs min_chars and/or max_chars (characters of the completion)")
        elif spec.min_chars is not None and spec.max_chars is not None and spec.min_chars > spec.max_chars:
            problems.append(f"{where}: min_chars={spec.min_chars} is above max_chars={spec.max_chars}")

    def score(self, spec, completion, row):
        n = len(completion.strip())
        if spec.max_chars is not None and n > spec.max_chars:
            return max(0.0, 1 - (n - spec.max_chars) / spec.max_chars)
        if spec.min_chars and n < spec.min_chars:
            return n / spec.min_chars
        return 1.0


class Http(Grader):
    name = "http"
    settings = ("url", "timeout_s")
    batch = True

    def check(self, spec, where, problems):
        why = url_problem(spec.url)
        if why:
            problems.append(f"{where}.url: {why}")


class Agent(Grader):
    name = "agent"
    settings = ("instructions", "wait_s")
    batch = True


GRADERS: dict[str, Grader] = {
    g.name: g for g in (ExactMatch(), Contains(), Regex(), JsonFields(), Numeric(), Length(), Http(), Agent())
}
COMMON = ("grader", "weight", "name")


def check_graders(specs: Sequence[GraderSpec], field: str = "graders") -> list[str]:
    """Problems with a request's graders: settings a grader does not take, bad patterns, URLs, duplicates."""
    problems: list[str] = []
    labels: list[str] = []
    for i, spec in enumerate(specs):
        where, grader = f"{field}[{i}]", GRADERS[spec.grader]
        extra = sorted(
            k
            for k in spec.model_fields_set
            if k not in COMMON and k not in grader.settings and getattr(spec, k) != GraderSpec.model_fields[k].default
        )
        if extra:
            problems.append(
                f"{where}: {extra} do not apply to grader {spec.grader!r}; "
                f"it takes {list(grader.settings) or 'nothing else'}"
            )
        grader.check(spec, where, problems)
        labels.append(spec.label)
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        problems.append(f"{field}: two graders are called {twice}; give each a distinct 'name'")
    if sum(s.grader == "agent" for s in specs) > 1:
        problems.append(f"{field}: at most one agent grader (the agent gives one score per completion)")
    return problems


def score_local(specs: Sequence[GraderSpec], completion: str, row: dict[str, Any]) -> dict[str, float]:
    """The scores of the graders that run in this process (all but http and agent), by label.

    Raises:
        ValueError: the row lacks a reference a grader reads, or holds a bad one.
    """
    return {s.label: GRADERS[s.grader].score(s, completion, row) for s in specs if not GRADERS[s.grader].batch}


def total(specs: Sequence[GraderSpec], scores: dict[str, float]) -> float:
    """The weighted sum of one completion's scores."""
    return sum(s.weight * scores[s.label] for s in specs)


def describe(specs: Sequence[GraderSpec]) -> str:
    """In a few words, for summaries: 'numeric + 0.2 x length'."""
    return " + ".join(s.label if s.weight == 1 else f"{s.weight:g} x {s.label}" for s in specs)
