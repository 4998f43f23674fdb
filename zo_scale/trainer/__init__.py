"""The training application behind launch/train.py: config -> model/backend/optimizer -> loop -> outputs.

    data.py   task splits, the (resumable) batch order, each rank's share of a step's batch
    build.py  model, tokenizer, PEFT, trainable subset, backend wrapping, optimizer
    loop.py   the training loop (evaluation, checkpoints, export, summary)
    cli.py    argument parsing, launch discovery, error handling and exit codes
"""
