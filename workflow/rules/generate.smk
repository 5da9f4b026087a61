# Generations of the instruction adapters for the report's qualitative table (llama_adapter.generate).


rule generate:
    input:
        base=BASE,
        tokenizer=TOKENIZER,
        adapter=trained_adapter,
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
        options=cli_options(
            {k: v for k, v in config["generate"].items() if k != "instructions"}
        ),
        adapter=lambda w, input: f"{w.experiment}={input.adapter}",
    shell:
        "llama-adapter generate --base {input.base:q} --tokenizer {input.tokenizer:q} "
        "--adapter {params.adapter:q} --prompts {input.prompts:q} --out {output:q} "
        "{params.options:q} > {log:q} 2>&1"
