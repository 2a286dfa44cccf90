"""Replays pd-proxy's token estimate (src/tokens.rs) over prompts whose true
counts came from the CPU stack's vLLM /tokenize (chat template included):
learn from the PD-routed prompts in random order, then measure the error."""
import csv, random, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
PER_MSG, FIXED = 5, 3
def template(r): return 0 if r['kind'] != 'chat' else FIXED + PER_MSG * int(r['n_messages'])
def est(r, milli): return -(-int(r['content_bytes']) * 1000 // milli) + template(r)
def learn(milli, r):
    text_tokens = int(r['n_true']) - template(r)
    if text_tokens < 32: return milli
    sample = min(max(int(r['content_bytes']) * 1000 // text_tokens, 250), 16000)
    return min(max(milli + ((sample - milli) >> 4), 250), 16000)
def report(name, milli, subset):
    errs = [(est(r, milli) - int(r['n_true'])) / int(r['n_true']) for r in subset]
    a = sorted(abs(e) for e in errs)
    q = lambda p: a[min(len(a) - 1, int(p * (len(a) - 1) + 0.5))]
    wrong = sum((est(r, milli) < 256) != (int(r['n_true']) < 256) for r in subset)
    print(f"{name:34s} n={len(subset):3d} median|err|={q(.5)*100:5.1f}% p90={q(.9)*100:5.1f}% p99={q(.99)*100:5.1f}% mean={statistics.mean(errs)*100:+5.1f}% wrong side of 256: {wrong}")
random.seed(1)
THRESH = 256
for label, milli0 in [("before learning (4.0 B/token)", 4000)]:
    for kind in ["chat", "completions"]:
        sub = [r for r in rows if r['kind'] == kind]
        report(f"{label} {kind}", milli0, sub)
        report(f"{label} {kind} 128-512", milli0, [r for r in sub if 128 <= int(r['n_true']) <= 512])
# Learning: the prompts routed PD under the current estimate teach it, in a random order.
order = rows[:]
random.shuffle(order)
milli = 4000
taught = 0
trace = []
for r in order:
    if est(r, milli) >= THRESH:   # routed PD: its prefill answer reports usage
        milli = learn(milli, r); taught += 1
        trace.append(milli)
print(f"learned ratio after {taught} PD prompts: {milli/1000:.3f} bytes/token; after 20/50/100: {[trace[i]/1000 for i in (19,49,99) if i < len(trace)]}")
for kind in ["chat", "completions"]:
    sub = [r for r in rows if r['kind'] == kind]
    report(f"learned {kind}", milli, sub)
    report(f"learned {kind} 128-512", milli, [r for r in sub if 128 <= int(r['n_true']) <= 512])
