"""The block-by-block calibrated family: the pipeline that runs one decoder block at a time over calibration
activations, and the methods it drives (GPTQ, AWQ)."""
