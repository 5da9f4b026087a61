# Generations of the instruction adapters for the report's qualitative table (llama_adapter.generate).


rule generate:
    input:
        base=BASE,
        tokenizer=TOKENIZER,
        adapter=rules.train_adapter.output.adapter,
        prompts=INSTRUCTIONS,
    output:
        f"{RESULTS}/generations/{{experiment}}.jsonl",
    log:
        f"{RESULTS}/logs/generate/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/generate/{{experiment}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=0,
    params:
        options=cli_options(
            {k: v for k, v in config["generate"].items() if k != "instructions"}
        ),
    shell:
        "llama-adapter generate --base {input.base} --tokenizer {input.tokenizer} "
        "--adapter {wildcards.experiment}={input.adapter} --prompts {input.prompts} --out {output} "
        "{params.options} > {log} 2>&1"
