# Sourced by the launch scripts. MODEL_ARGS: --arch ARCH (default: DEFAULT_ARCH, set by the pretraining
# scripts; the evaluation scripts leave it unset and take the model the checkpoint was trained with) and --cfg
# CFG (default: the architecture's ImageNet yaml; none for the ViTs and the torchvision ResNets), with the
# trailing MODEL.NUM_CLASSES 0 kept last by the callers. Run from the repository root.
ARCH=${ARCH:-${DEFAULT_ARCH:-}}
case "$ARCH" in
    swin_*) DEFAULT_CFG=experiments/imagenet/swin/${ARCH}_patch4_window7_224.yaml ;;
    cvt_*) DEFAULT_CFG=experiments/imagenet/cvt_v4/s1.yaml ;;
    vil_*) DEFAULT_CFG=experiments/imagenet/vil/${ARCH}.yaml ;;
    *) DEFAULT_CFG= ;;
esac
CFG=${CFG-$DEFAULT_CFG}
MODEL_ARGS=()
if [ -n "$ARCH" ]; then
    MODEL_ARGS+=(--arch "$ARCH")
fi
if [ -n "$CFG" ]; then
    MODEL_ARGS+=(--cfg "$CFG")
fi

# The inputs of the evaluation scripts (eval_knn.sh, eval_linear.sh).
require_eval_inputs() {
    : "${DATA_PATH:?set DATA_PATH to the folder with train/ and val/}"
    : "${CKPT_PATH:?set CKPT_PATH to the pretraining checkpoint}"
    : "${OUT_PATH:?set OUT_PATH to the output folder}"
}
