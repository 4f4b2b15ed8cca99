"""How much of a stage's prompts sits in a prefix an earlier call about the same question already
sent: what vLLM's automatic prefix caching and hosted prompt caches can reuse.

A request is read as the sequence its endpoint sees: per message, its role, then its parts in
order; an image is one unit (equal when its bytes are, by sha256), text is characters. For each
call, its shared prefix is the longest common prefix with any earlier call of the same group
(the same question and image), in estimated tokens (vlpref/planning.py: text at 4 characters a
token, images by the endpoint kind's rule). The share is the shared tokens over all prompt
tokens. Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from vlpref.chat import ChatRequest, ImagePart, TextPart
from vlpref.planning import CHARS_PER_TOKEN, image_tokens

Unit = tuple[str, str]  # ("t", one character) | ("i", image sha256) | ("r", role)


def units(request: ChatRequest) -> list[Unit]:
    out: list[Unit] = []
    for message in request.messages:
        out.append(("r", message.role))
        for part in message.content:
            if isinstance(part, ImagePart):
                out.append(("i", part.sha256 or str(hash(part.data))))
            elif isinstance(part, TextPart):
                out.extend(("t", ch) for ch in part.text)
    return out


def common_prefix(a: Sequence[Unit], b: Sequence[Unit]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Share:
    """Prompt tokens in all, and those in a prefix an earlier call of the group sent."""

    calls: int = 0
    tokens: float = 0.0
    shared: float = 0.0

    @property
    def ratio(self) -> float:
        return self.shared / self.tokens if self.tokens else 0.0


def _weight(unit: Unit, image_weight: float) -> float:
    if unit[0] == "i":
        return image_weight
    if unit[0] == "t":
        return 1.0 / CHARS_PER_TOKEN
    return 0.0


def prefix_share(
    requests: Iterable[ChatRequest],
    group_of: Callable[[ChatRequest], Hashable],
    *,
    kind: str = "openai",
    image_override: int | None = None,
) -> Share:
    """The share of prompt tokens in a prefix shared with an earlier call of the same group,
    requests taken in the order given (the order the stage sends them)."""
    seen: dict[Hashable, list[list[Unit]]] = defaultdict(list)
    share = Share()
    for request in requests:
        images = [p for m in request.messages for p in m.content if isinstance(p, ImagePart)]
        image_weight = float(image_tokens(images[0], kind, image_override)) if images else 0.0
        seq = units(request)
        weights = [_weight(u, image_weight) for u in seq]
        group = seen[group_of(request)]
        best = max((common_prefix(seq, earlier) for earlier in group), default=0)
        share.calls += 1
        share.tokens += sum(weights)
        share.shared += sum(weights[:best])
        group.append(seq)
    return share
