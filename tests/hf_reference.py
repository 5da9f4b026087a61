"""The tiny random configurations the parity tests compare against HF transformers (and PEFT on top of it)."""

import torch

from llama_adapter.config import ModelArgs

TINY = ["tiny", "tiny-gqa", "tiny-tied"]


def hf_config(args: ModelArgs):
    """Our ModelArgs as transformers' LlamaConfig (eager attention: the reference, not the fastest path)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings, attn_implementation="eager",
    )


def tokens(args, B=2, T=11, seed=1):
    return torch.randint(0, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def random_hf_llama(args: ModelArgs, folder=None, random_norms: bool = False):
    """A random HF LlamaForCausalLM of `args` (torch seed 0), in eval mode, saved by save_pretrained (safetensors)
    to `folder` if given. random_norms: norm weights drawn from U(0.5, 1.5) instead of HF's ones, so that a wrong
    name mapping of the norms shows."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(args)).eval()
    if random_norms:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    if folder is not None:
        hf.save_pretrained(folder)
    return hf
