"""Image classification (task=image) on the same trainer, backends and accumulation cycle.

    data.py       data=shapes (generated, embedded) and data=imagefolder: samples by index
    processor.py  resolution, per-channel mean/std (the image processor), train augmentation
    loader.py     global batch s -> this rank's K micro-batches of images (the text loader's order)
    model.py      AutoModelForImageClassification from model.image or model.pretrained; the loss
    batchnorm.py  the BatchNorm guard, SyncBatchNorm (CUDA: torch's; CPU: GlooSyncBatchNorm),
                  model.bn_momentum=per_cycle
    checks.py     validation.validate()'s checks for task=image (bad folders, labels, the guard)
    plan.py       activations per image vs resolution; train.micro_batch_size=auto
    task.py       evaluation (eval_loss, eval_accuracy) and FLOPs per image

The trainer's normaliser N (target tokens of the whole cycle on all ranks) is, for images, the
number of images of the whole cycle on all ranks: K x b on W ranks is one batch of K*b*W.
"""
