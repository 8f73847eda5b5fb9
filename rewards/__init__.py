"""User rewards for the GRPO stage, loaded by dotted path from a recipe (`rewards.examples.novelty`)."""
