#!/usr/bin/env bash
# Sourced by ptuning/, lora/ and finetune/ train.sh and evaluate.sh after their variables: the run they share.
# Each script keeps the variables a user edits and the flags of its own method; what every method passes the
# same way (data, lengths, batch, output, previous runs, processes) is written once here.

# train_method METHOD [flags]: METHOD/main.py --do_train with train.sh's variables, then the method's flags, then
# the arguments the user gave the script.
train_method() {
    local method=$1
    shift
    ensure_model "$MODEL"
    extra=()
    [ -n "${QUANTIZATION_BIT:-}" ] && extra+=(--quantization_bit "$QUANTIZATION_BIT")
    [ -n "${MAX_MEMORY_GIB:-}" ] && extra+=(--max_memory_gib "$MAX_MEMORY_GIB")
    case "$PREVIOUS_RUN" in
        move) extra+=(--overwrite_output_dir) ;;
        refuse) ;;
        *) echo "error: PREVIOUS_RUN must be move or refuse, got '$PREVIOUS_RUN'" >&2; exit 2 ;;
    esac
    data_flags
    source "$REPO/scripts/launch.sh"          # sets launch (python or torchrun), adds --deepspeed
    "${launch[@]}" "$REPO/$method/main.py" \
        --do_train \
        --model_name_or_path "$MODEL" \
        --train_file "$TRAIN_FILE" \
        --validation_file "$DEV_FILE" \
        --prompt_column "$PROMPT_COLUMN" \
        --response_column "$RESPONSE_COLUMN" \
        --max_source_length "$MAX_SOURCE_LENGTH" \
        --max_target_length "$MAX_TARGET_LENGTH" \
        --learning_rate "$LR" \
        --per_device_train_batch_size "$BATCH_SIZE" \
        --gradient_accumulation_steps "$GRAD_ACCUM" \
        --max_steps "$MAX_STEPS" \
        --logging_steps 10 \
        --save_steps "$SAVE_STEPS" \
        --output_dir "$OUTPUT_DIR" \
        --report_to tensorboard \
        "${extra[@]}" "$@"
}

# evaluate_method METHOD [flags]: answer and score every row of TEST_FILE with CHECKPOINT (STEP: one of its
# checkpoint-N folders; none: the base alone), and with COMPARE_BASE=1 the base too, side by side.
evaluate_method() {
    local method=$1
    shift
    check_compare_base
    ensure_model "$MODEL"
    extra=()
    [ -n "$QUANTIZATION_BIT" ] && extra+=(--quantization_bit "$QUANTIZATION_BIT")
    data_flags
    source "$REPO/scripts/launch.sh"          # sets launch (python or torchrun), adds --deepspeed
    local checkpoint=$CHECKPOINT${STEP:+/checkpoint-$STEP} model=$MODEL tuned=()
    if [ "$CHECKPOINT" = none ]; then
        OUTPUT_DIR=${OUTPUT_DIR/#none/output/base-model}
    elif [ "$method" = finetune ]; then
        model=$checkpoint                     # a fully fine-tuned model is a model folder: it replaces MODEL
    else
        tuned=(--"${method}_checkpoint" "$checkpoint")
    fi
    predict "$method" "$OUTPUT_DIR" "$model" "${tuned[@]}" "$@"
    if [ "$COMPARE_BASE" = 1 ]; then
        predict "$method" "$OUTPUT_DIR/base" "$MODEL" "$@"
        compare_with_base "$OUTPUT_DIR" "$checkpoint"
    fi
}

# predict METHOD FOLDER MODEL [flags]: METHOD/main.py --do_predict on TEST_FILE, written to FOLDER.
predict() {
    "${launch[@]}" "$REPO/$1/main.py" \
        --do_predict \
        --model_name_or_path "$3" \
        --test_file "$TEST_FILE" \
        --prompt_column "$PROMPT_COLUMN" \
        --response_column "$RESPONSE_COLUMN" \
        --max_source_length "$MAX_SOURCE_LENGTH" \
        --max_target_length "$MAX_TARGET_LENGTH" \
        --per_device_eval_batch_size "$EVAL_BATCH_SIZE" \
        --output_dir "$2" \
        --report_to none \
        "${extra[@]}" "${@:4}"
}

# evaluate.sh's COMPARE_BASE: 0, or 1 with a checkpoint to compare with the base.
check_compare_base() {
    if [ "$COMPARE_BASE" != 0 ] && [ "$COMPARE_BASE" != 1 ]; then
        echo "error: COMPARE_BASE must be 0 or 1, got '$COMPARE_BASE'" >&2
        exit 2
    fi
    if [ "$COMPARE_BASE" = 1 ] && [ "$CHECKPOINT" = none ]; then
        echo "error: COMPARE_BASE=1 compares a CHECKPOINT with the base, and CHECKPOINT is none" >&2
        exit 2
    fi
}

# The scores of the tuned model (in folder $1) and of the untuned base (in $1/base), side by side.
compare_with_base() {
    echo
    "${PYTHON:-python3}" "$REPO/evaluate/score.py" "$1/base/generated_predictions.txt" "$1/generated_predictions.txt" \
        --labels "untuned base" tuned
    echo "tuned: $2; predictions in $1/generated_predictions.txt and $1/base/generated_predictions.txt"
}

data_flags() {                                # the data variables that are passed only when set
    [ -n "$HISTORY_COLUMN" ] && extra+=(--history_column "$HISTORY_COLUMN")
    [ -n "$DATA_FORMAT" ] && extra+=(--data_format "$DATA_FORMAT")
    return 0
}
