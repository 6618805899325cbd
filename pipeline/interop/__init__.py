"""Other tools' formats in and out: nnU-Net v2 trained-model folders (`nnunet`), their plans
(`nnunet_plans`), checkpoints and pickles (`nnunet_files`) and network weights (`nnunet_weights`).
Stage-neutral: it may use every stage package; no stage package imports it."""
