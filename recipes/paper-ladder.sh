#!/usr/bin/env bash
# recipes/paper-ladder.sh: the experiments of the BD3-LM paper (Arriola et al., ICLR 2025),
# with bd3 commands only, at a size that runs on a laptop CPU.
#
# What it reproduces
#   - Baselines: AR, MDLM and SEDD, each trained STEPS steps from scratch (Tables 3-4).
#   - The paper's protocol: a base at L' = L (MDLM) for BASE_STEPS steps, fine-tuned for
#     STEPS - BASE_STEPS steps at each L' in BLOCK_SIZES (16, 8, 4), once with the paper's
#     clipped mask-rate interval (CLIP_16/8/4, from its Tables 2 and 8) and once with the plain
#     linear schedule (Tables 2 and 8: clipped vs linear, perplexity and NELBO variance).
#   - Table 1: BD3-LM at L' = 1 with a fully masked block (--clip 1,1, mask rate 1: every
#     token predicted from the clean tokens before it) next to AR.
#   - Every final model sees the same number of training tokens (STEPS x BATCH x LENGTH).
#   - Evaluation of every final model: the validation perplexity (EVAL_OPTS; the report shows
#     each bound with its 95 % interval), zero-shot on the built-in held-out sets (ZS_SETS),
#     generative perplexity under the AR run as the judge (NUM_SAMPLES samples per model, with
#     model calls per token and entropy; Table 7), the NELBO variance over the paper's clip
#     grid for each linear fine-tune, and samples 4x longer than the context (Table 6).
#   - Finally `bd3 report` over all runs into $OUT/report (report.md/.json/.html, figures).
#
# Budget: the defaults (nano model, L = 128, batch 16, STEPS = 900 with a 600-step base) took
# 77 minutes on 2 CPU cores (docs/reproduction.md): training took 53 minutes of one core
# (one thread; a nano step of the 2L block-diffusion pass about 0.4-0.5 s there, AR, MDLM
# and SEDD one L-token stream, about half of that) while the other core evaluated the runs
# that had finished. Run as is (one command after the other), about 1.5 hours.
#
# Resumable: a run whose final checkpoint exists is skipped, a run killed midway resumes
# from its newest checkpoint, and an evaluation whose record (RUN/eval/<kind>-*.json, saved by
# `bd3 eval` and `bd3 variance`) exists is skipped. Run the script again after a crash, or to
# add what a changed variable asks for (a new OUT starts afresh).
#
# Scale it with variables, e.g.
#   MODEL=tiny STEPS=20000 BASE_STEPS=15000 ./recipes/paper-ladder.sh
#   DATA=lm1b TOKENIZER=bert-base-uncased MODEL=small LENGTH=128 DEVICE=cuda NPROC=8 BATCH=64 \
#     GLOBAL_BATCH=512 STEPS=1000000 BASE_STEPS=850000 ./recipes/paper-ladder.sh
#   DATA=owt TOKENIZER=gpt2 WRAP=raw MODEL=small LENGTH=1024 DEVICE=cuda NPROC=8 BATCH=16 \
#     GLOBAL_BATCH=512 STEPS=1000000 BASE_STEPS=850000 ZS_SETS=ptb,wikitext2,lm1b,lambada,ag_news,pubmed,arxiv \
#     ./recipes/paper-ladder.sh
# The paper's settings: the `small` DiT (768 wide, 12 layers, 12 heads), global batch 512,
# AdamW lr 3e-4 with 2500 warm-up steps, EMA 0.9999, bf16, the t estimator; an L' = L base of 850K steps, then
# 150K fine-tune steps per block size (1M in all: 65B tokens on LM1B at L = 128 with
# bert-base-uncased and [BOS] ... [EOS] rows; 524B tokens on OpenWebText at L = 1024 with
# GPT-2 and raw rows, WRAP=raw); test perplexity on LM1B's test split and OWT's last 100k
# documents; gen PPL of 300 samples under GPT-2 Large (JUDGE=gpt2-large).
#
# Variables (defaults in brackets):
#   MODEL [nano]  LENGTH [128]  DATA [web]  TOKENIZER [bpe]  WRAP [special: raw for OWT-like data]
#   DEVICE [auto]  NPROC [1: more runs training under torchrun]  OUT [ladder]
#   STEPS [900]: training steps per final model; BASE_STEPS [2/3 of STEPS]: the L' = L base's share
#   BATCH [16]  GLOBAL_BATCH [BATCH x NPROC]  BLOCK_SIZES ["16 8 4"]  CLIP_16, CLIP_8 ["0.3,0.8"]  CLIP_4 ["0.45,0.95"]
#   TRAIN_ESTIMATOR [t]: the training estimator of the diffusion runs: t is the paper's (a mask rate per
#     block; its clipped intervals bound that rate, and every count of masked tokens still occurs);
#     k trains faster at this size (README: "A first run that learns") but --clip then bounds the count
#   TRAIN_OPTS [""]: extra options for every pretrain and finetune (e.g. --eval-batches 4)
#   EVAL_OPTS ["--estimator k --passes 2"]: the estimator options of every `bd3 eval` perplexity
#   SEDD_EVAL_OPTS ["--estimator t --passes 4"]: the same for the SEDD run (time-conditioned: k does not apply);
#     the AR run is scored by its exact NLL
#   EVAL_BATCHES [all]: validation batches per evaluation; ZS_SETS [devil,jargon,mhcc]; ZS_BATCHES [32]
#   JUDGE [the AR run]  NUM_SAMPLES [16]  GEN_TOKENS [LENGTH]: gen-PPL samples and their length
#   VAR_BATCHES [16]  VAR_OPTS [""]: `bd3 variance` batches and options (default: the paper's grid)
#   LONG_TOKENS [4 x LENGTH]  LONG_SAMPLES [4]: the samples longer than the context
#   BD3 [bd3]: the command (e.g. "python -m bd3")
set -euo pipefail

MODEL=${MODEL:-nano}
LENGTH=${LENGTH:-128}
DATA=${DATA:-web}
TOKENIZER=${TOKENIZER:-bpe}
WRAP=${WRAP:-special}
DEVICE=${DEVICE:-auto}
NPROC=${NPROC:-1}
OUT=${OUT:-ladder}
STEPS=${STEPS:-900}
BASE_STEPS=${BASE_STEPS:-$((STEPS * 2 / 3))}
BATCH=${BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-}
BLOCK_SIZES=${BLOCK_SIZES:-16 8 4}
CLIP_16=${CLIP_16:-0.3,0.8}
CLIP_8=${CLIP_8:-0.3,0.8}
CLIP_4=${CLIP_4:-0.45,0.95}
TRAIN_ESTIMATOR=${TRAIN_ESTIMATOR:-t}
TRAIN_OPTS=${TRAIN_OPTS:-}
EVAL_OPTS=${EVAL_OPTS:---estimator k --passes 2}
SEDD_EVAL_OPTS=${SEDD_EVAL_OPTS:---estimator t --passes 4}
EVAL_BATCHES=${EVAL_BATCHES:-}
ZS_SETS=${ZS_SETS:-devil,jargon,mhcc}
ZS_BATCHES=${ZS_BATCHES:-32}
JUDGE=${JUDGE:-}
NUM_SAMPLES=${NUM_SAMPLES:-16}
GEN_TOKENS=${GEN_TOKENS:-$LENGTH}
VAR_BATCHES=${VAR_BATCHES:-16}
VAR_OPTS=${VAR_OPTS:-}
LONG_TOKENS=${LONG_TOKENS:-$((4 * LENGTH))}
LONG_SAMPLES=${LONG_SAMPLES:-4}
BD3=${BD3:-bd3}

FT_STEPS=$((STEPS - BASE_STEPS))
if ((BASE_STEPS < 1 || FT_STEPS < 1)); then
  echo "paper-ladder: BASE_STEPS ($BASE_STEPS) must be at least 1 and below STEPS ($STEPS)" >&2
  exit 2
fi
RUNS=$OUT/runs
JUDGE=${JUDGE:-$RUNS/ar}
if ((NPROC > 1)); then TRAIN="torchrun --nproc-per-node $NPROC -m bd3"; else TRAIN=$BD3; fi
BATCHING=(--batch-size "$BATCH")
[[ -n $GLOBAL_BATCH ]] && BATCHING+=(--global-batch-size "$GLOBAL_BATCH")
DATA_OPTS=(--data "$DATA" --tokenizer "$TOKENIZER" --wrap "$WRAP" --model "$MODEL" --length "$LENGTH")
LIMIT=()
[[ -n $EVAL_BATCHES ]] && LIMIT=(--max-batches "$EVAL_BATCHES")
mkdir -p "$RUNS" "$OUT/samples"

say() { printf '\n== %s\n' "$*" >&2; }

# train NAME STEPS pretrain|finetune OPTIONS...: skipped when the run's final checkpoint exists,
# resumed when an earlier checkpoint does, else started (replacing a folder with no checkpoint).
train() {
  local name=$1 steps=$2 command=$3 dir=$RUNS/$1
  shift 3
  if [[ -d $dir/checkpoints/$(printf 'step-%08d' "$steps") ]]; then
    say "$name: trained, skipped"
  elif compgen -G "$dir/checkpoints/step-*" > /dev/null; then
    say "$name: resuming"
    $TRAIN "$command" --resume --out "$dir" --steps "$steps"
  else
    say "$name: $command $*"
    # shellcheck disable=SC2086  # TRAIN_OPTS holds several options
    $TRAIN "$command" "$@" --steps "$steps" "${BATCHING[@]}" --device "$DEVICE" --out "$dir" --force $TRAIN_OPTS
  fi
}

# done RUN KIND: whether RUN already holds an evaluation record of KIND
done_eval() { compgen -G "$1/eval/$2-*.json" > /dev/null; }

# ---------------------------------------------------------------------------- training
train ar "$STEPS" pretrain --algo ar "${DATA_OPTS[@]}"
train mdlm "$STEPS" pretrain --algo mdlm --estimator "$TRAIN_ESTIMATOR" "${DATA_OPTS[@]}"
train sedd "$STEPS" pretrain --algo sedd "${DATA_OPTS[@]}"
train bd3-bs1-fullmask "$STEPS" pretrain --algo bd3lm --block-size 1 --clip 1,1 --estimator "$TRAIN_ESTIMATOR" "${DATA_OPTS[@]}"
train base "$BASE_STEPS" pretrain --algo mdlm --estimator "$TRAIN_ESTIMATOR" "${DATA_OPTS[@]}"
for bs in $BLOCK_SIZES; do
  clip_var=CLIP_$bs
  clip=${!clip_var:-$CLIP_16}
  train "bd3-bs$bs-clip" "$FT_STEPS" finetune "$RUNS/base" --block-size "$bs" --clip "$clip" --estimator "$TRAIN_ESTIMATOR"
  train "bd3-bs$bs-linear" "$FT_STEPS" finetune "$RUNS/base" --block-size "$bs" --estimator "$TRAIN_ESTIMATOR"
done

FINAL=(ar mdlm sedd bd3-bs1-fullmask)
for bs in $BLOCK_SIZES; do FINAL+=("bd3-bs$bs-clip" "bd3-bs$bs-linear"); done

# ---------------------------------------------------------------------------- evaluation
for name in "${FINAL[@]}"; do
  dir=$RUNS/$name
  opts=$EVAL_OPTS
  [[ $name == sedd ]] && opts=$SEDD_EVAL_OPTS
  [[ $name == ar ]] && opts=""  # its NLL is exact: no estimator
  # shellcheck disable=SC2086  # the options are several words
  if ! done_eval "$dir" ppl; then
    say "$name: validation perplexity"
    $BD3 eval "$dir" $opts "${LIMIT[@]}" --batch-size "$BATCH" --device "$DEVICE"
  fi
  # shellcheck disable=SC2086
  if ! done_eval "$dir" zero-shot; then
    say "$name: zero-shot on $ZS_SETS"
    $BD3 eval "$dir" --zero-shot "$ZS_SETS" $opts --max-batches "$ZS_BATCHES" --batch-size "$BATCH" --device "$DEVICE"
  fi
  if ! done_eval "$dir" gen-ppl; then
    say "$name: generative perplexity under $JUDGE"
    $BD3 eval "$dir" --gen-ppl --judge "$JUDGE" --num-samples "$NUM_SAMPLES" --max-tokens "$GEN_TOKENS" --device "$DEVICE"
  fi
done

for bs in $BLOCK_SIZES; do
  dir=$RUNS/bd3-bs$bs-linear
  # shellcheck disable=SC2086  # VAR_OPTS holds several options
  if ! done_eval "$dir" variance; then
    say "bd3-bs$bs-linear: NELBO variance over the clip grid"
    $BD3 variance "$dir" --max-batches "$VAR_BATCHES" --batch-size "$BATCH" --device "$DEVICE" $VAR_OPTS
  fi
done

for name in ar mdlm $(for bs in $BLOCK_SIZES; do echo "bd3-bs$bs-clip"; done); do
  file=$OUT/samples/$name.jsonl
  if [[ ! -s $file ]]; then
    say "$name: $LONG_SAMPLES samples of $LONG_TOKENS tokens (context $LENGTH)"
    $BD3 sample "$RUNS/$name" --max-tokens "$LONG_TOKENS" --num-samples "$LONG_SAMPLES" --format jsonl --device "$DEVICE" > "$file.tmp"
    mv "$file.tmp" "$file"
  fi
done

# ---------------------------------------------------------------------------- report
say "report: $OUT/report"
$BD3 report "$RUNS"/* --out "$OUT/report" --force
