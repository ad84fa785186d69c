"""One reader per annotation file format (supervision's layout): `coco`, `yolo`, `voc` and `hf`
(Hugging Face detection datasets), and `annotations`, what they share (AnnotatedImage, the fault
policy, box conventions). `data_builders.grounding.load_annotations` is the one face over them."""
