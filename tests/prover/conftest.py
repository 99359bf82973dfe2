"""Tiny random HF models and a tokenizer trained here (no downloads)."""

import pytest
import torch

CORPUS = [
    "theorem add_comm' (a b : Nat) : a + b = b + a := by",
    "  simp [Nat.add_comm]",
    "  omega",
    "lemma two : 1 + 1 = 2 := by norm_num",
    "  intro x; exact x",
    "  rw [mul_comm]; ring",
    "```lean\n```",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS (a plain function: spawned ranks build it too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_model(family, vocab, dtype=torch.float64, seed=0):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).eval().to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # random init is nearly flat: widen the logits so greedy ties are impossible
        for module in model.modules():  # Qwen2's q/k/v biases start at zero: make them matter
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def model_factory(tokenizer):
    return lambda family, **kw: make_model(family, len(tokenizer), **kw)


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def model(request, tokenizer):
    return make_model(request.param, len(tokenizer))
