"""`GrammarConstraint`: a logits processor that holds each row of a batch to a grammar (llguidance).

The grammar is text in llguidance's Lark dialect (`SamplingParams.grammar`; stage 2's comes from
`selfalign.triggers.format_grammar`). Each row gets its own matcher; before each step the matcher
consumes the row's last token and writes which next tokens the grammar allows into a bitmask, and
the disallowed logits become -inf, so the sampler after it (or greedy argmax) only ever picks an
allowed token. Both Hugging Face decoders apply it, as they apply the other processors
(processors.py); vLLM applies the same grammar with its own "guidance" backend (vllm.py).

Rows may have different grammars (leave-one-out decodes several principle sets' rows in one
batch): `grammar` is then a list with one grammar per row, None for an unconstrained row; each
distinct grammar is compiled once and its matcher copied for each of its rows.

Where the grammar is complete, end of text is the only token left. A row whose matcher refuses a
token has finished (after end of text, or a stop string, `generate` fills it with padding), and is
left unconstrained.
"""

from __future__ import annotations

from typing import Sequence


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as error:  # a dependency of the package, so only a broken install lacks it
        raise ImportError("constrained decoding needs llguidance: pip install llguidance") from error
    return llguidance


def check_grammar(grammar: str) -> None:
    """ValueError naming the problem when llguidance cannot compile `grammar`."""
    llguidance = _llguidance()
    try:
        compiled = llguidance.grammar_from("lark", grammar)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"the grammar does not compile: {error}") from error
    if failed:
        raise ValueError(f"the grammar does not compile: {'; '.join(messages)}")


def grammar_tokenizer(tokenizer, eos_ids: Sequence[int]):
    """llguidance's view of a Hugging Face tokenizer (every token's bytes); building it walks the
    vocabulary, so a backend builds it once."""
    return _llguidance().hf.from_tokenizer(tokenizer, eos_token=list(eos_ids))


class GrammarConstraint:
    """Masks, at every step, the tokens that `grammar` does not allow after each row's tokens so far.

    `grammar` is one grammar for every row, or a list of one per row (None: that row is free).
    """

    def __init__(self, ll_tokenizer, grammar: str | Sequence[str | None], rows: int, prompt_width: int):
        llguidance = _llguidance()
        grammars = [grammar] * rows if isinstance(grammar, str) else list(grammar)
        if len(grammars) != rows:
            raise ValueError(f"{len(grammars)} grammars for {rows} rows")
        # A matcher holds its compiled grammar; a copy of it is cheap, a new one compiles again.
        compiled = {text: llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", text), log_level=0)
                    for text in dict.fromkeys(g for g in grammars if g is not None)}
        for matcher in compiled.values():
            if matcher.is_error():  # else the row would silently be held to end of text alone
                raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
        self.matchers = [None if g is None else compiled[g].deep_copy() for g in grammars]
        self.bitmask = llguidance.torch.allocate_token_bitmask(rows, ll_tokenizer.vocab_size)
        self.prompt_width = prompt_width
        self.finished = [m is None for m in self.matchers]  # a free row is as unconstrained as a finished one
        self._fill, self._apply = llguidance.torch.fill_next_token_bitmask, llguidance.torch.apply_token_bitmask_inplace

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_width:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if not self.finished[row] and not self.matchers[row].consume_token(token):
                    self.finished[row] = True  # padding after the row stopped (or end of text)
        for row, matcher in enumerate(self.matchers):
            if self.finished[row]:
                self.bitmask[row].fill_(-1)  # every bit set: anything goes
            else:
                self._fill(matcher, self.bitmask, row)
        self._apply(scores, self.bitmask.to(scores.device))
        return scores


def accepts(grammar: str, tokenizer, text: str, complete: bool = False) -> bool:
    """Whether `text`, tokenized as the model would write it, is allowed by `grammar` (as a start
    of it; with `complete`, as a whole). For tests and the book: the decoders never need it."""
    llguidance = _llguidance()
    eos = tokenizer.eos_token_id
    matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, [eos] if eos is not None else []),
                                   llguidance.grammar_from("lark", grammar), log_level=0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(matcher.consume_token(token) for token in ids) and (not complete or matcher.is_accepting())
