"""Amortized inference: GFlowNet fine-tuning of a LoRA policy q_θ that samples σ directly (MATH.md, "Amortized
inference (GFlowNet, sub-trajectory balance)")."""

from twistlm.gfn.policy import LoraSettings, attach_lora, base_model_of, load_policy, save_policy

__all__ = ["LoraSettings", "attach_lora", "base_model_of", "load_policy", "save_policy"]
