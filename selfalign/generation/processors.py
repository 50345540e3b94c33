"""Our logits processors: repetition controls over the generated tokens only, and a logit bias.

transformers' own repetition penalty and no-repeat n-gram ban count the prompt's tokens too; these
count only those after the prompt's width, as Dromedary's released generation does (a teacher
rewriting a question may quote it). `LogitBias` adds fixed biases to token ids, which
`contract.first_token_biases` maps from texts. Token choice is not here: that is sampler.py, or
greedy argmax.
"""

from __future__ import annotations
class GeneratedRepetitionPenalty:
    """transformers' repetition penalty (positive logits divided by it, negative ones multiplied)
    over the tokens each row has generated, those after `prompt_width`; the prompt's are free."""

    def __init__(self, penalty: float, prompt_width: int):
        self.penalty, self.prompt_width = penalty, prompt_width

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] == 0:
            return scores
        picked = scores.gather(1, generated)
        return scores.scatter(1, generated, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))


class GeneratedNoRepeatNGram:
    """Bans a token that would complete an n-gram already in the row's generated tokens (those
    after `prompt_width`); an n-gram of the prompt may be generated once."""

    def __init__(self, size: int, prompt_width: int):
        self.size, self.prompt_width = size, prompt_width

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_width:]
        length, n = generated.shape[1], self.size
        if length < n:
            return scores
        grams = generated.unfold(1, n, 1)  # (batch, length - n + 1, n)
        continues = (grams[:, :, :-1] == generated[:, None, length - n + 1:]).all(-1)
        vocab = scores.shape[-1]
        # Rows' non-matching n-grams point at a spare column, so that every write is True.
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(continues, grams[:, :, -1], vocab), True)
        return scores.masked_fill(banned[:, :vocab], float("-inf"))


class LogitBias:
    """Adds a fixed bias to some token ids' logits at every step (`first_token_biases`)."""

    def __init__(self, biases: dict[int, float], device):
        import torch

        self.ids = torch.tensor(list(biases), dtype=torch.long, device=device)
        self.values = torch.tensor(list(biases.values()), device=device)

    def __call__(self, input_ids, scores):
        values = self.values.to(scores.dtype).expand(scores.shape[0], -1)
        return scores.index_add(1, self.ids, values)
