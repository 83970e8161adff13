"""Config objects of tiny models of every architecture in the matrix, built offline from their config classes."""

from __future__ import annotations

from typing import Any

# make_tiny_model arguments for Qwen2.5-0.5B's shape (its config.json); add model_vocab_size=151936 for its vocabulary
QWEN25_05B = dict(
    hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864, tie_word_embeddings=True
)


# Tiny checkpoints of these architectures are built offline from their config classes (tests/test_architectures.py).
TINY_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "GptOssForCausalLM",
    "FalconForCausalLM",
    "DeepseekV3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)


def tiny_config(architecture: str, common: dict, intermediate_size: int, num_experts: int):
    """The transformers config of a tiny model of `architecture` (common: the shared shape arguments)."""
    import transformers

    moe = dict(num_experts_per_tok=2)
    dense = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "Gemma3ForCausalLM": transformers.Gemma3TextConfig,
    }
    if architecture == "Gemma3ForCausalLM":  # queries scaled by 1/sqrt(head_dim), as Gemma 3 1B-12B have it
        return transformers.Gemma3TextConfig(
            intermediate_size=intermediate_size, query_pre_attn_scalar=common["head_dim"], **common
        )
    if architecture in dense:
        return dense[architecture](intermediate_size=intermediate_size, **common)
    if architecture == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size // 2,
            num_experts=num_experts,
            norm_topk_prob=True,  # as every Qwen3 MoE checkpoint has it
            **moe,
            **common,
        )
    if architecture == "MixtralForCausalLM":
        return transformers.MixtralConfig(
            intermediate_size=intermediate_size // 2, num_local_experts=num_experts, **moe, **common
        )
    if architecture == "GptOssForCausalLM":
        return transformers.GptOssConfig(
            intermediate_size=intermediate_size // 2,
            num_local_experts=num_experts,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(common["num_hidden_layers"])],
            sliding_window=128,  # gpt-oss-20b / 120b: every other layer attends to the last 128 tokens
            **moe,
            **common,
        )
    if architecture == "FalconForCausalLM":  # Falcon-7B's layout: multi-query attention, parallel attention + MLP
        falcon = {
            k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads", "tie_word_embeddings")
        }
        return transformers.FalconConfig(
            ffn_hidden_size=4 * common["hidden_size"],  # Falcon's MLP is 4x wide (llama.cpp assumes it)
            multi_query=True,
            num_kv_heads=1,  # what multi_query means (config.json then says so, as Falcon-7B's implies)
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
            **falcon,
        )
    if architecture == "DeepseekV3ForCausalLM":  # MLA attention; layer 0 dense, layer 1 MoE with a shared expert;
        # bitsandbytes' CPU 4-bit kernel needs in-features a multiple of 64 and out-features one of 32
        mla = {k: v for k, v in common.items() if k != "head_dim"}
        head = common["head_dim"]
        return transformers.DeepseekV3Config(
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size // 2,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            scoring_func="sigmoid",  # as DeepSeek-V3's config.json says (transformers assumes it; llama.cpp reads it)
            topk_method="noaux_tc",
            q_lora_rank=common["hidden_size"] // 2,
            kv_lora_rank=common["hidden_size"] // 2,
            qk_nope_head_dim=head,
            qk_rope_head_dim=head,
            v_head_dim=head,
            **moe,
            **mla,
        )
    if architecture.endswith("ForConditionalGeneration"):
        return _tiny_vlm_config(architecture, common, intermediate_size, num_experts)
    raise ValueError(f"architecture={architecture!r}; allowed: {list(TINY_ARCHITECTURES)}")


def _tiny_vlm_config(architecture: str, common: dict, intermediate_size: int, num_experts: int):
    """A vision-language model: the tiny text model plus a one-layer vision tower; image tokens at the end of the
    vocabulary."""
    import transformers

    text = {**common, "vocab_size": common["vocab_size"] + 3, "intermediate_size": intermediate_size}
    image, boi, eoi = text["vocab_size"] - 1, text["vocab_size"] - 3, text["vocab_size"] - 2
    vision: dict[str, Any]
    if architecture == "Gemma3ForConditionalGeneration":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        return transformers.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=image,
            boi_token_index=boi,
            eoi_token_index=eoi,
            eos_token_id=common["eos_token_id"],
            pad_token_id=common["pad_token_id"],
        )
    if architecture == "Qwen3VLMoeForConditionalGeneration":
        half = common["head_dim"] // 2
        text.update(
            moe_intermediate_size=intermediate_size // 2,
            num_experts=num_experts,
            num_experts_per_tok=2,
            rope_scaling={"rope_type": "default", "mrope_section": [half // 2, half // 4, half // 4]},
        )
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=common["hidden_size"],
            patch_size=8,
            temporal_patch_size=2,
            spatial_merge_size=2,
            deepstack_visual_indexes=[0],
        )
        return transformers.Qwen3VLMoeConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=image,
            vision_start_token_id=boi,
            vision_end_token_id=eoi,
            eos_token_id=common["eos_token_id"],
            pad_token_id=common["pad_token_id"],
        )
    raise ValueError(f"architecture={architecture!r}; allowed: {list(TINY_ARCHITECTURES)}")
