"""Training: models, datasets, the training loop, run directories and checkpoints (docs/train.md).

  config       TrainConfig, validation before any engine starts, launcher detection
  engine       --engine horovod | torch: starts the engine, returns its communicator
  models       PreAct-ResNet-18/34, ResNet-20, small CNN, MLP, logistic regression, torchvision
  data         digits, synthetic, CIFAR-10/100, Tiny ImageNet readers; shards, order, augmentation
  loop         the data-parallel loop (`run`)
  distributed  which distributed optimizer runs, and the loop's one adapter to it
  dense        the dense P-SGD baseline on each engine
  evaluation   evaluation of the model averaged over ranks, metric collectives
  results      the run directory of docs/design.md, compression ratio, the summary table
  checkpoint   one shard per rank plus rank 0's manifest, written atomically

This layer's collectives all go through a communicator (hvdcomp.comm); `hvdcomp train`
(cli/train.py) validates the user's input and calls :func:`hvdcomp.train.loop.run`.
"""
