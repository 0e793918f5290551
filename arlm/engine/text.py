"""One sequence's text: incremental detokenizing, stop strings, and what is safe to stream.

Each generated token goes out in one chunk once its text is final. Text is held back while it
might still be cut: while it might be the beginning of a stop string, and, under the "stop" and
"break" loop policies, while a loop found later could still cut it off (``LoopGuard.settled``: a
token or two in ordinary text, the repeats while a loop forms). So the chunks always join to the
completion's text, and streamed text is never taken back.
"""

from __future__ import annotations

from arlm.tokenizer import Tokenizer


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string.

    Only the places in the last ``len(s) - 1`` characters where ``s``'s first character occurs
    are tried, longest first, so a long text or long stop strings cost little per token.
    """
    longest = 0
    end = len(text)
    for s in stops:
        # a start at i holds back end - i characters: only starts before end - longest beat it
        i = text.find(s[0], max(end - len(s) + 1, 0), end - longest)
        while i >= 0:
            if s.startswith(text[i:]):
                longest = end - i
                break
            i = text.find(s[0], i + 1, end - longest)
    return longest


class TextState:
    """The decoded text of one sequence's generated ids, and how much of it went out.

    ``ends[i]`` is ``len(text)`` once generated id ``i`` is decoded; ``emitted`` counts the
    characters released, ``sent`` the ids released (one chunk each).
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], min_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stop, self.min_tokens = stop, min_tokens
        self.max_stop = max((len(s) for s in stop), default=0)
        self.decoder = tokenizer.decoder()
        self.text = ""
        self.ends: list[int] = []
        self.emitted = self.sent = 0

    def push(self, token_id: int) -> None:
        self.text += self.decoder.push(token_id)
        self.ends.append(len(self.text))

    def truncate(self, keep: int) -> None:
        """Keep the text of the first ``keep`` ids (a loop's first copy ends there)."""
        del self.ends[keep:]
        self.text = self.text[: self.ends[-1]] if self.ends else ""

    def restart(self, ids: list[int]) -> None:
        """Decode afresh after a rollback to ``ids``: the decoder's state must be that of those
        ids, not of the ones rolled back."""
        self.decoder = self.tokenizer.decoder()
        self.text = "".join(self.decoder.push(t) for t in ids)
        del self.ends[len(ids) :]

    def find_stop(self) -> bool:
        """Cut the text at the first stop string, if one has appeared; whether one did.

        A stop string counts from the ``min_tokens``-th token's text on. Called after every
        token, so one that appeared must end inside the newest token's text: only the tail
        from ``max_stop - 1`` characters before it is searched, whatever the text's length.
        """
        n = len(self.ends)
        if not self.stop or n < self.min_tokens:
            return False
        floor = self.ends[self.min_tokens - 2] if self.min_tokens >= 2 else 0
        before = self.ends[-2] if n >= 2 else 0  # the text's end before the newest token
        search_from = max(floor, before - self.max_stop + 1, 0)
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def release(self, settled: int, final: bool = False) -> list[tuple[int, str]]:
        """(index, text) for each id up to ``settled`` not yet sent, with the text now safe to
        stream (everything, when ``final``)."""
        limit = len(self.text)
        if not final and self.stop and len(self.ends) >= self.min_tokens:
            limit -= stop_holdback(self.text, self.stop)
        out = []
        for i in range(self.sent, settled):
            end = max(self.emitted, min(self.ends[i], limit))
            out.append((i, self.text[self.emitted : end]))
            self.emitted = end
        self.sent = max(self.sent, settled)
        return out

    def flush(self) -> None:
        """The decoder's held-back bytes, at the end of a generation cut by length."""
        self.text += self.decoder.flush()

    def rest(self) -> str:
        """Whatever text has not gone out yet (for the closing chunk)."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece
