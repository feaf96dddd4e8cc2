"""Next-token choice from last-position logits: greedy, or temperature / top-k / top-p."""
import numpy as np


class Sampler:
    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self):
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] -> token ids [batch]."""
        if self.greedy:
            return logits.argmax(-1)
        return np.array([self._one(row) for row in logits.astype(np.float64)])

    def _one(self, logits):
        logits = logits / self.temperature
        order = np.argsort(-logits)
        if self.top_k:
            order = order[:self.top_k]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        if self.top_p < 1:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = np.searchsorted(np.cumsum(probs), self.top_p) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order[self.rng.choice(len(order), p=probs)]
