"""`StaticDecoder`: the "hf-static" backend's decode loop over a preallocated, fixed-shape cache.

It decodes one batch whose logits processors and stopping criteria it is given (by `HFBackend`,
the same ones `model.generate` gets); it does not tokenize, choose tokens itself, or decide when
to compile (`HFBackend` does: on CUDA by default).
"""

from __future__ import annotations

from .cache import cache_keyword, copy_prefix
class StaticDecoder:
    """Greedy-or-sampled decoding over a preallocated `StaticCache`, one fixed-shape step at a time.

    Every decode step reads the same buffers (last tokens, their positions, the cache position, a
    full-length attention mask and the cache), so it can be compiled once with CUDA graphs
    (`torch.compile(mode="reduce-overhead")`): on an H200 the same scheme reached 70% of the
    memory floor at batch 64 where `generate` reached 10% (benchmarks/RESULTS.md). Token choice,
    penalties and stopping stay outside the graph, in the logits processors and transformers'
    stopping criteria that `generate` is given too, so they match it exactly. The prefill
    (variable width) runs eagerly.
    """

    check_every = 8  # steps between checks whether every row has stopped

    def __init__(self, model, batch: int, cache_len: int, compile: bool = False, shared_prefix_cache=None):
        import inspect

        import torch
        from transformers import StaticCache

        self.model, self.batch, self.cache_len = model, batch, cache_len
        device = model.device
        # With `shared_prefix_cache` (one row), this decoder is for that prefix: its rows attend to
        # it in place (shared_prefix.py) and hold only the tokens after it.
        self.shared_prefix_cache = shared_prefix_cache
        if shared_prefix_cache is None:
            self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
            self.prefix_len = 0
        else:
            from .shared_prefix import PrefixedCache

            self.prefix_len = shared_prefix_cache.get_seq_length()
            self.cache = PrefixedCache(shared_prefix_cache, cache_len - self.prefix_len)
            if compile:
                for layer in shared_prefix_cache.layers:  # read by every replay, never copied into it
                    torch._dynamo.mark_static_address(layer.keys)
                    torch._dynamo.mark_static_address(layer.values)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        # The whole length at once: columns not yet written are masked causally by position, and
        # a fixed shape is what lets the step be captured.
        self.mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Later transformers track the write position inside the cache; earlier ones need it passed.
        self._wants_cache_position = "cache_position" in inspect.signature(base.forward).parameters
        self._cache_kw = cache_keyword(model)
        self.compiled = compile
        self._step = self._forward_step
        if compile:
            for buffer in (self.tokens, self.positions, self.cache_position, self.mask):
                torch._dynamo.mark_static_address(buffer)  # written in place between replays
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self._step = torch.compile(self._forward_step, mode=mode, fullgraph=True)

    def _forward(self, input_ids, position_ids, cache_position):
        extra = {"cache_position": cache_position} if self._wants_cache_position else {}
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=self.mask, use_cache=True,
                          logits_to_keep=1, **{self._cache_kw: self.cache}, **extra).logits[:, -1].float()

    def _forward_step(self):
        return self._forward(self.tokens, self.positions, self.cache_position)

    def decode(self, input_ids, attention_mask, processors, stopping, max_new_tokens: int, pad_id: int,
               prefix_cache=None) -> list[list[int]]:
        """New token ids per row, as `generate` returns them (rows that stopped are padded).

        `prefix_cache` is copied into every row; a decoder built with a shared prefix uses its own.
        """

        batch, width = input_ids.shape
        if batch != self.batch or width + max_new_tokens > self.cache_len:
            raise ValueError(f"a batch of {batch}x{width}+{max_new_tokens} does not fit this decoder's "
                             f"{self.batch}x{self.cache_len}")
        if self.shared_prefix_cache is None:
            return self._decode(input_ids, attention_mask, processors, stopping, max_new_tokens, pad_id, prefix_cache)
        from .shared_prefix import shared_attention

        with shared_attention(self.model):
            return self._decode(input_ids, attention_mask, processors, stopping, max_new_tokens, pad_id, None)

    def _decode(self, input_ids, attention_mask, processors, stopping, max_new_tokens, pad_id, prefix_cache):
        import torch

        batch, width = input_ids.shape
        with torch.inference_mode():
            self.cache.reset()
            self.mask.zero_()
            self.mask[:, :width] = attention_mask
            self.mask[:, width:width + max_new_tokens] = 1
            # Positions count real tokens only, as generate derives them from the mask.
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            start = copy_prefix(prefix_cache, self.cache, batch) if prefix_cache is not None else self.prefix_len
            logits = self._forward(input_ids[:, start:], positions[:, start:],
                                   torch.arange(start, width, device=input_ids.device))
            self.positions.copy_(positions[:, -1:] + 1)
            self.cache_position.fill_(width)

            sequences = torch.full((batch, width + max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
            sequences[:, :width] = input_ids
            unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
            # Steps taken while some row was unfinished: generate's output length. Counted on the
            # device, so that asking whether all rows are done (a sync) happens every few steps only.
            steps = torch.zeros((), dtype=torch.long, device=input_ids.device)
            for step in range(max_new_tokens):
                if step:
                    if self.compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = self._step().clone()  # a graph's output is overwritten by its next replay
                scores = processors(sequences[:, :width + step], logits)
                steps += unfinished.any()
                chosen = torch.where(unfinished, scores.argmax(-1), pad_id)
                sequences[:, width + step] = chosen
                unfinished &= ~stopping(sequences[:, :width + step + 1], scores)
                if step + 1 == max_new_tokens or (step % self.check_every == 0 and not bool(unfinished.any())):
                    break
                self.tokens.copy_(chosen[:, None])
                if step:
                    self.positions.add_(1)
                    self.cache_position.add_(1)
        steps = int(steps)
        return sequences[:, width:width + steps].tolist()
