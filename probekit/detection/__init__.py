"""Detection from the feature cache: box probes on stored tokens (`detect`, FCOS-style heads on
a simple feature pyramid, every lr x wd x layer-set head trained in one batched pass), COCO and
VOC metrics through a real evaluator, and a training-free localisation score (CorLoc).

    metrics.py  COCO AP (faster-coco-eval), VOC AP50, bootstrap, CorLoc
"""
