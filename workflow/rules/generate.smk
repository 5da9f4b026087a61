# Generations of the instruction adapters for the report's qualitative table (llama_adapter.generate).


rule generate:
    input:
        base=BASE,
        tokenizer=TOKENIZER,
        trained=trained,
        prompts=INSTRUCTIONS,
    output:
        f"{RESULTS}/generations/{{experiment}}.jsonl",
    log:
        f"{RESULTS}/logs/generate/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generate/{{experiment}}.tsv"
    conda:
        CONDA_ENV
    threads: 1  # mostly start-up and small forward passes: runs beside a training job
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=0,
    params:
        options=cli_options(decoding_settings()) + compile_cache(config["generate"]),
        # The rows are named after the experiment: by NAME=PATH, or --name for a full fine-tune or zero-shot base.
        model=lambda w, input: model_options(w, input, named=True),
    shell:
        "llama-adapter generate {params.model:q} --tokenizer {input.tokenizer:q} "
        "--prompts {input.prompts:q} --out {output:q} "
        "{params.options:q} > {log:q} 2>&1"
