"""From generated token ids to streamed text: incremental decoding and stop strings.

Two things make this more than ``decode(token)``: a byte-level BPE token can end in the middle
of a UTF-8 character (the decoded text then ends in U+FFFD until the next token completes it),
and a stop string can arrive split over several tokens. So a TextStream decodes everything
generated so far, and releases only text that can no longer change or turn out to be part of a
stop string; the stop string itself is never released. Ids whose text ends on a whole character
are decoded once: later pushes decode only the ids after them (a push costs the new tokens, not
the whole answer again).
"""

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one by one (``push``); get back the newly safe text each time."""

    def __init__(self, decode, stop=()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids = []
        self.emitted = 0          # characters of the text released so far
        self.text = ""            # final text (up to, not including, a stop string)
        self.stopped = False
        self._done_ids, self._done_text = 0, ""   # a prefix of ids and its text, which cannot change

    def _decode(self) -> str:
        """The text of every id so far."""
        tail = self.decode(self.ids[self._done_ids:])
        full = self._done_text + tail
        if tail and not tail.endswith(REPLACEMENT):  # ends on a whole character: nothing can join it
            self._done_ids, self._done_text = len(self.ids), full
        return full

    def push(self, token):
        """Add one token; return the text that became safe to show ('' if none)."""
        self.ids.append(int(token))
        full = self._decode()
        for s in self.stop:  # a stop string may start inside text released earlier: search back
            at = full.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.stopped = True
                return self._release(full, at)
        safe = len(full)
        while safe > self.emitted and full[safe - 1] == REPLACEMENT:  # an unfinished character
            safe -= 1
        safe = min(safe, len(full) - self._held(full))
        return self._release(full, max(safe, self.emitted))

    def finish(self):
        """The end (length limit or cancel): release whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self._decode(), None)

    def _held(self, full):
        """Length of the longest end of ``full`` that starts some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, full, upto):
        upto = len(full) if upto is None else upto
        piece = full[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        self.text = full[:self.emitted]
        return piece
