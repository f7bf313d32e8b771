"""rlkd.quantize on a tiny randomly initialised Llama (no downloads): the linear weights really
are 4-bit, the model still generates, a saved checkpoint loads back to the same function, and
the transformers engine feeds `rlkd.eval.score` like vLLM does."""

import json
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlkd.compose import load_config
from rlkd.errors import InputError
from rlkd.models import count_parameters
from rlkd.tasks import quantize as q
from rlkd.types import SamplingSpec

VOCAB = ["<pad>", "<eos>", *string.printable]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; enough to prompt and decode a random model."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                      tie_word_embeddings=tied, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "fp32"
    tiny_llama(tied=True).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_linear_weights_are_stored_in_four_bits():
    model = tiny_llama()
    info = q.quantize_model(model, group_size=32)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert info["quantized_linears"] == len(linears) == 14
    assert info["bits_per_linear_weight"] == 4 + 2 * 16 / 32  # + a bf16 scale and zero per 32
    for m in linears:
        w = m.weight
        assert isinstance(w, q.Int4OpaqueTensor)
        assert w.qdata.dtype == torch.uint8
        assert w.qdata.numel() * 8 == w.numel() * 4  # two 4-bit weights per byte
    assert not isinstance(head.weight, q.Int4OpaqueTensor)
    sizes = q.storage_bytes(model)
    name = "model.layers.0.mlp.down_proj.weight"
    # int4 data + one bf16 scale and zero per 32 weights, vs 4 bytes per float32 weight
    assert sizes[name] < 0.2 * 4 * model.model.layers[0].mlp.down_proj.weight.numel()
    assert count_parameters(model) == count_parameters(tiny_llama())  # logical shapes kept


def test_quantized_model_still_computes_the_same_function_roughly_and_generates():
    ref, model = tiny_llama(), tiny_llama()
    q.quantize_model(model, group_size=32)
    ids = torch.randint(2, 100, (2, 12))
    with torch.inference_mode():
        a, b = ref(ids).logits, model(ids).logits.float()
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    assert out.shape == (2, 17)


def test_group_size_errors_are_one_line_and_name_the_layer():
    with pytest.raises(InputError, match=r"^group size 48: .*\(32, 64, 128, 256\)"):
        q.quantize_model(tiny_llama(), group_size=48)
    with pytest.raises(InputError, match=r"does not divide the input size of model\.layers\.0\.self_attn\.q_proj \(64\)"):
        q.quantize_model(tiny_llama(), group_size=128)


def test_save_load_round_trip(checkpoint, tmp_path):
    dst = tmp_path / "int4"
    info = q.quantize(checkpoint, dst, group_size=32)
    assert q.is_quantized(dst) and not q.is_quantized(checkpoint)
    assert json.loads((dst / q.QUANT_FILE).read_text())["quantized_linears"] == 14
    assert not (tmp_path / "int4.tmp").exists()
    fp32_bytes = (checkpoint / "model.safetensors").stat().st_size
    assert info["weights_bytes"] < 0.4 * fp32_bytes
    loaded = q.load(dst)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie survives
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    fresh = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    q.quantize_model(fresh, group_size=32)
    ids = torch.randint(2, 100, (1, 10))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, fresh(ids).logits)


def test_generator_batches_like_single_prompts_and_cuts_at_eos(checkpoint):
    model, tok = q.load(checkpoint), char_tokenizer()
    gen = q.TransformersGenerator(model, tok, batch_size=3)
    prompts = ["Question: 2+3?\nAnswer:", "Hi", "Question: what is 12 times 7?\nAnswer:"]
    spec = SamplingSpec(n=1, max_tokens=6, temperature=0.0)
    batched = gen(prompts, spec)
    single = [gen([p], spec) for p in prompts]
    assert batched.completion_ids == [s.completion_ids[0] for s in single]
    assert [len(p) for p in batched.prompt_ids] == [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    for ids, lps, cut in zip(batched.completion_ids, batched.logprobs, batched.truncated, strict=True):
        assert len(ids) == len(lps) and all(lp <= 0 for lp in lps)
        assert cut == (len(ids) == 6 and ids[-1] != 1)
    # An eos that greedy decoding picks first: every completion is that one token.
    model.generation_config.eos_token_id = batched.completion_ids[0][0]
    first = q.TransformersGenerator(model, tok)(prompts[:1], spec)
    assert first.completion_ids == [[batched.completion_ids[0][0]]] and first.truncated == [False]
    with pytest.raises(InputError, match="greedily"):
        gen(prompts, SamplingSpec(n=1, max_tokens=4, temperature=0.7))


def test_evaluate_writes_what_rlkd_eval_writes(checkpoint, tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(3)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    int4 = tmp_path / "int4"
    q.quantize(checkpoint, int4, group_size=32)
    for model_dir, engine in ((int4, "int4"), (checkpoint, "float32")):
        run = tmp_path / f"eval-{engine}"
        run.mkdir()
        cfg = load_config("eval_gsm8k", ["task=eval", f"model.name={model_dir}", f"data.path={data}",
                                         "data.instruction=''", "eval.max_new_tokens=8", "model.max_model_len=512"])
        q.evaluate(cfg, run)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["num_samples"] == 3 and engine in metrics["engine"]
        for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "tokens_per_s", "latency_per_sample_s",
                    "peak_memory_gb", "parameters", "mean_completion_tokens", "model"):
            assert metrics[key] is not None, key
        assert metrics["peak_memory_gb"] > 0 and metrics["parameters"] == count_parameters(checkpoint)
        predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        assert [p["gold"] for p in predictions] == ["0", "2", "4"]
