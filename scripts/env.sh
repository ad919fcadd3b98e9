# Offline-by-default environment for every command of this repo (sourced by the scripts).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export RAGAS_DO_NOT_TRACK=true
export DVC_NO_ANALYTICS=1
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
