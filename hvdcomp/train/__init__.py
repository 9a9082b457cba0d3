"""Training: models, datasets, the training loop, run directories and checkpoints (docs/train.md).

  config      TrainConfig, validation before hvd.init, launcher detection
  models      PreAct-ResNet-18/34, ResNet-20, small CNN, MLP, logistic regression, torchvision
  data        digits, synthetic, CIFAR-10/100 and Tiny ImageNet readers; shards, order, augmentation
  loop        the data-parallel loop (`run`) and the one adapter to the distributed optimizer
  results     the run directory of docs/design.md, compression ratio, the summary table
  checkpoint  atomic checkpoints holding every rank's state

This layer knows no collectives beyond what the loop asks Horovod for; `hvdcomp train`
(cli/train.py) validates the user's input and calls :func:`hvdcomp.train.loop.run`.
"""
