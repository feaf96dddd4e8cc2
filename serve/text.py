"""Token ids -> text pieces for a stream, with OpenAI's `stop` strings.

A piece is held back while the text ends in an incomplete UTF-8 character (the
tokenizer's replacement character) or in what could still become a stop string,
so that a stop string never reaches the client, even split across tokens."""


class TextStream:
    def __init__(self, decode, stop=()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids, self.text, self.shown = [], "", 0
        self.stopped = False

    def add(self, token):
        """The new piece of text after one more token ('' while held back); sets .stopped at a stop string."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                return self._show(len(self.text))
        if self.text.endswith("\ufffd"):
            return ""
        return self._show(len(self.text) - self._held())

    def finish(self):
        """What was held back, once the request is over (no stop string can complete any more, and an
        incomplete character stays what the tokenizer makes of it, as in pop-generate's text)."""
        return self._show(len(self.text))

    def _held(self):
        """Length of the longest end of the text that begins some stop string."""
        return max([n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])] or [0])

    def _show(self, upto):
        piece = self.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece
