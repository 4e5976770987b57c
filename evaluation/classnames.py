"""Class vocabularies, index 0 always 'background': the names are both legend labels and CLIP text.

Only the foreground names (index 1 on) go through the text tower; background is what a segment
becomes when no class scores above the threshold. The text names are those GroupViT feeds its text
encoder, so scores stay comparable with it: VOC's diningtable / pottedplant / tvmonitor are
'table' / 'plant' / 'monitor', and PASCAL Context says 'airplane', 'plant', 'monitor'. COCO keeps the
official category names. ImageNet-1k names come from open_clip (the CLIP paper's cleaned list).
"""

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor",
)  # fmt: skip

# PASCAL Context 59 classes in the label order of mmsegmentation's VOC2010 converter, plus background.
CONTEXT_CLASS_NAMES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "plant", "road",
    "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "monitor", "wall", "water", "window", "wood",
)  # fmt: skip

# The 80 COCO thing categories as (category id in the instances JSON, name); ids run 1..90 with gaps.
COCO_THING_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"),
    (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"),
    (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"),
    (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"),
    (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"),
    (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

# COCO category id -> COCO-Object class index (1..80, in category id order; 0 is background).
COCO_CATEGORY_TO_INDEX = {category: index for index, (category, _) in enumerate(COCO_THING_CATEGORIES, 1)}

COCO_OBJECT_CLASS_NAMES = ("background",) + tuple(name for _, name in COCO_THING_CATEGORIES)

IMAGENET_VOCABULARY_NAMES = ("imagenet", "imagenet1k")


def imagenet_class_names() -> tuple[str, ...]:
    """('background', the 1000 ImageNet-1k names); imports open_clip (and torch), so only when asked for."""
    import open_clip

    return ("background",) + tuple(open_clip.IMAGENET_CLASSNAMES)
