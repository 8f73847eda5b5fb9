"""The training toolkit the stage commands share, apart from the commands: it never reads a recipe.

    arguments     TRL arguments from a TrainConfig, precision, process rank, checkpoint resume and its inputs
                  record, LoRA, the choice of LM head
    guard         eval-gated training: NDCG@K on validation users every N steps, best weights kept, early stop
    diagnostics   training-health warnings (collapsed rewards, zero gradients, ...) from the trainer's logs
    preferences   mined hard and popular negatives, preference rows for DPO / S-DPO
    sdpo          the multi-negative S-DPO loss
    sft_rows      SFT rows: one per target, or one per user window with a loss on every item (sequence rows)
    sft_cache     TRL's tokenised SFT rows cached under the data folder, keyed by what they depend on

The commands (`rlrec.stages`) build the trainers from these; `rlrec.stages.runner.train_and_save` is the one tail
they all end with.
"""
