"""Pure tensor math for CoPD: GRPO, OPD/MOPD advantages, behavioural overlap. No process groups."""
