"""Fluency as an independent language model judges it: a Kneser-Ney trigram model trained only on the train split's
gold responses, and the perplexity it gives each generator's test responses (lower: more like what people write),
with the gold test responses' own perplexity as the reference.

Independent of every generator: it never saw their outputs or the test split, so a generator cannot raise its score
by degenerate text the way it can raise Dist-n. Movies are one word ("@movie") whatever their id, so naming a rare
movie costs nothing. Interpolated Kneser-Ney with one absolute discount D per order (Chen and Goodman 1998):

    P3(w | u v) = max(c(u v w) - D, 0) / c(u v .) + D N1+(u v .) / c(u v .) P2(w | v)
    P2(w | v)   = max(N1+(. v w) - D, 0) / N1+(. v .) + D N1+(v .) / N1+(. v .) P1(w)
    P1(w)       = (N1+(. w) + 1) / (N1+(. .) + V + 1)        continuation counts, add-one for unseen words

and an unseen context passes all its mass to the next order. nltk.lm's KneserNeyInterpolated implements the same
model but scores about 11 ms per trigram here (an hour for the test responses of five generators): counts in
dictionaries score them in seconds.
"""

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

START, END, MOVIE = "<s>", "</s>", "@movie"
DISCOUNT = 0.75
_MOVIE = re.compile(r"^@\d+$")


def _padded(words: Sequence[str]) -> list[str]:
    return [START, START] + [MOVIE if _MOVIE.match(w) else w for w in words] + [END]


class TrigramLM:
    """Interpolated Kneser-Ney trigrams over word lists (the module docstring gives the equations)."""

    def __init__(self, sentences: Sequence[Sequence[str]]):
        trigrams = Counter(tuple(p[i : i + 3]) for p in map(_padded, sentences) for i in range(len(p) - 2))
        self.trigrams = trigrams
        self.context = Counter()  # c(u v .)
        self.context_types = Counter()  # N1+(u v .)
        bigram_left = Counter()  # N1+(. v w): distinct u before (v, w)
        for (u, v, w), count in trigrams.items():
            self.context[(u, v)] += count
            self.context_types[(u, v)] += 1
            bigram_left[(v, w)] += 1
        self.bigram_left = bigram_left
        self.middle_types = Counter()  # N1+(. v .): distinct (u, w) around v, summed as N1+(. v w) over w
        self.middle_follow = Counter()  # N1+(v .) among those bigrams
        unigram_left = defaultdict(set)  # N1+(. w): distinct v before w
        for (v, w), count in bigram_left.items():
            self.middle_types[v] += count
            self.middle_follow[v] += 1
            unigram_left[w].add(v)
        self.unigram = {w: len(vs) for w, vs in unigram_left.items()}
        self.unigram_total = sum(self.unigram.values())
        self.vocabulary = len(self.unigram) + 1  # + the unseen word

    def _p1(self, w: str) -> float:
        return (self.unigram.get(w, 0) + 1) / (self.unigram_total + self.vocabulary)

    def _p2(self, v: str, w: str) -> float:
        total = self.middle_types.get(v, 0)
        if not total:
            return self._p1(w)
        seen = max(self.bigram_left.get((v, w), 0) - DISCOUNT, 0) / total
        return seen + DISCOUNT * self.middle_follow[v] / total * self._p1(w)

    def probability(self, u: str, v: str, w: str) -> float:
        total = self.context.get((u, v), 0)
        if not total:
            return self._p2(v, w)
        seen = max(self.trigrams.get((u, v, w), 0) - DISCOUNT, 0) / total
        return seen + DISCOUNT * self.context_types[(u, v)] / total * self._p2(v, w)

    def perplexity(self, sentences: Sequence[Sequence[str]]) -> float:
        """exp of the mean negative log-probability per word (the end of each sentence included)."""
        log_sum, words = 0.0, 0
        for padded in map(_padded, sentences):
            for i in range(len(padded) - 2):
                log_sum -= math.log(self.probability(*padded[i : i + 3]))
                words += 1
        return math.exp(log_sum / words) if words else float("nan")
