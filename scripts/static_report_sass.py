"""scripts/static_report.py's reading of compiled code: nvcc builds every kernel instantiation
into a cubin, ptxas -v gives registers, spills and shared memory (hence occupancy), nvdisasm gives
the SASS, whose main loop per kernel is found and run as one warp through a register scoreboard
(iteration_cycles). kernel_table puts it together per bf16 kernel."""
import math, os, re, shutil, subprocess, sys

from static_report_source import all_kernels_source

# Per-SM limits (CUDA occupancy calculator / programming guide tables for cc 9.0 and 8.0).
SM_LIMITS = {
    "sm_90a": dict(regs=65536, reg_unit=256, max_warps=64, max_blocks=32, smem=228 * 1024, smem_reserved=1024),
    "sm_80": dict(regs=65536, reg_unit=256, max_warps=64, max_blocks=32, smem=164 * 1024, smem_reserved=1024),
}
# Threads per block of each kernel kind (from the launchers).
BLOCK = {"gemv": 256, "gemv_mma": 256, "qgemv": 256, "attention": 128, "combine": 128, "rms_norm": 256, "silu_mul": 256}


def find_tool(name, pip_pkg):
    """nvdisasm comes with the CUDA toolkit or as a PyPI wheel; look in $<NAME>, on PATH, next to
    nvcc, in the wheels' nvidia/cu*/bin; if absent, try pip once; else say how to get it."""
    def search():
        nvcc = shutil.which("nvcc")
        cands = [os.environ.get(name.upper()), shutil.which(name), nvcc and os.path.join(os.path.dirname(os.path.realpath(nvcc)), name)]
        cands += [os.path.join(p, "nvidia", sub, "bin", name) for p in sys.path for sub in ("cu13", "cu12")]
        return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if tool := search():
        return tool
    print(f"static_report: {name} not found, trying `pip install {pip_pkg}`", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", pip_pkg], check=False)
    import site
    sys.path += site.getsitepackages() + [site.getusersitepackages()]
    if tool := search():
        return tool
    # Exit status 3: a tool is missing (CI treats that as a skip, any other failure as a failure).
    print(f"static_report: {name} is needed: `pip install {pip_pkg}` (or put the CUDA toolkit's bin on PATH, "
          f"or set {name.upper()}=/path/to/{name})", file=sys.stderr)
    sys.exit(3)


def compile_cubin(src, arch, workdir):
    """Compiles every kernel instantiation of the tree `src` as the project does (cuda_check.sh
    flags) into one cubin; returns (cubin path, ptxas -v text)."""
    cubin = os.path.join(workdir, f"kernels-{arch}.cubin")
    cmd = [os.environ.get("NVCC", "nvcc"), "-std=c++20", "-O3", f"-I{src}/csrc", "-cubin", f"-arch={arch}",
           "-Xptxas", "-v", all_kernels_source(src, workdir), "-o", cubin]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"static_report: nvcc failed:\n{r.stderr}")
    return cubin, r.stdout + r.stderr


def demangle(names):
    """Readable kernel names: cu++filt if present, else c++filt (the Itanium ABI is the same)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text):
    """Per mangled kernel: registers, spill bytes, stack, static shared memory, from ptxas -v."""
    res, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = res.setdefault(m.group(1), dict(regs=0, spill_stores=0, spill_loads=0, stack=0, smem=0))
        elif cur is not None:
            if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
                cur.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
            if m := re.search(r"Used (\d+) registers", line):
                cur["regs"] = int(m[1])
                s = re.search(r"(\d+) bytes smem", line)
                cur["smem"] = int(s[1]) if s else 0
    return res


def occupancy(arch, regs, smem, threads):
    """Resident blocks and warps per SM from registers (per-warp allocation rounded to 256),
    static shared memory (+1 KB reserved per block) and the block/warp caps."""
    L = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(regs, 1) * 32 / L["reg_unit"]) * L["reg_unit"]
    by_regs = L["regs"] // (per_warp * warps)
    by_smem = L["smem"] // (smem + L["smem_reserved"]) if smem else L["max_blocks"]
    blocks = min(by_regs, by_smem, L["max_blocks"], L["max_warps"] // warps)
    limiter = min((by_regs, "registers"), (by_smem, "shared memory"), (L["max_blocks"], "blocks"),
                  (L["max_warps"] // warps, "warps"))[1]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, occupancy=blocks * warps / L["max_warps"], limiter=limiter)


INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(dis):
    """nvdisasm -c output -> {mangled: [(addr, opcode, operands)], labels} per function."""
    funcs, cur, pending = {}, None, []
    for line in dis.splitlines():
        if m := re.match(r"^\.text\.(\w+):", line):
            cur = funcs[m[1]] = dict(insns=[], labels={}, preds=[])
            continue
        if cur is None:
            continue
        if m := re.match(r"^(\.L_x_\d+):", line):
            pending.append(m[1])
        elif m := INSN.search(line):
            for lab in pending:
                cur["labels"][lab] = len(cur["insns"])
            pending = []
            cur["insns"].append((int(m[1], 16), m[3], m[4].strip()))
            cur["preds"].append((m[2] or "").strip())
    return funcs


def load_bytes(op):
    """Bytes per lane of a global load opcode (LDG.E.128 -> 16, .64 -> 8, .U16 -> 2, else 4)."""
    for tag, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if tag in op:
            return n
    return 4


def regs_of(tok):
    """Registers named by one operand: R4 -> {4}; R4.64 -> {4, 5}."""
    out = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?", tok):
        out |= {int(m[1]), int(m[1]) + 1} if m[2] else {int(m[1])}
    return out


def dest_and_srcs(op, operands):
    """Destination registers (first operand when it is a plain register, widened for vector loads)
    and source registers (the rest; every operand for stores, branches and predicate writers)."""
    parts = [p.strip() for p in operands.split(",")] if operands else []
    if parts and re.fullmatch(r"R\d+", parts[0]) and not op.startswith(("ST", "RED", "ATOM", "BRA")):
        r = int(parts[0][1:])
        width = load_bytes(op) // 4 if op.startswith("LD") else (2 if ".WIDE" in op else 1)
        return set(range(r, r + max(width, 1))), set().union(*[regs_of(p) for p in parts[1:]]) if parts[1:] else set()
    return set(), set().union(*[regs_of(p) for p in parts]) if parts else set()


def loops(fn):
    """Loops as (head index, backward-branch index): a BRA whose target label precedes it."""
    out = []
    for i, (_, op, opnds) in enumerate(fn["insns"]):
        if op.startswith("BRA") and (m := re.search(r"\(\s*(\.L_x_\d+)\s*\)", opnds)):
            t = fn["labels"].get(m[1])
            if t is not None and t <= i:
                out.append((t, i))
    return out


def drop_fallback_blocks(fn, h, b, stream):
    """The loop body fn[h..b] without the basic blocks that stream with loads narrower than its
    widest (the scalar fall-back of a runtime `vector_loads` / alignment test inside the same
    loop): the model follows the vector path, as on aligned tensors."""
    body = fn["insns"][h:b + 1]
    widest = max((load_bytes(op) for _, op, _ in body if op.startswith("LDG") and stream(op)), default=0)
    starts, blocks = set(fn["labels"].values()), [[]]
    for i, ins in zip(range(h, b + 1), body):
        if i in starts and blocks[-1]:
            blocks.append([])
        blocks[-1].append(ins)
        if ins[1].startswith(("BRA", "EXIT")):
            blocks.append([])
    is_narrow = lambda op: op.startswith("LDG") and stream(op) and load_bytes(op) < widest
    # If-converted fall-backs: the narrow loads and everything under their predicate (@!P0 ...).
    preds = {fn["preds"][i] for i in range(h, b + 1) if is_narrow(fn["insns"][i][1]) and fn["preds"][i]}
    dropped = {id(fn["insns"][i]) for i in range(h, b + 1) if fn["preds"][i] in preds}
    return [ins for blk in blocks if not any(is_narrow(op) and id(i) not in dropped for i in blk for op in [i[1]])
            for ins in blk if id(ins) not in dropped]


def analyse_loop(fn, stream):
    """Picks the main loop (most global-load bytes per iteration, then the shortest) and counts its
    instructions, global loads by width, the stream loads (DRAM) issued before the first instruction
    that reads any loaded register, and runs the one-warp scoreboard over it (see the docstring)."""
    best = None
    for h, b in loops(fn):
        body = fn["insns"][h:b + 1]
        lb = [load_bytes(op) * (1 + 1000 * stream(op)) for _, op, _ in body if op.startswith("LDG")]
        key = (sum(lb), -(b - h))
        if best is None or key > best[0]:
            best = (key, (h, b))
    if best is None or best[0][0] == 0:
        return None
    body = drop_fallback_blocks(fn, *best[1], stream)
    glds = [op for _, op, _ in body if op.startswith("LDG")]
    streamed = [op for op in glds if stream(op)]
    loaded, before = set(), 0
    for _, op, opnds in body:
        d, s = dest_and_srcs(op, opnds)
        if s & loaded:
            break
        if op.startswith("LDG"):
            loaded |= d
            before += stream(op)
    return dict(instructions=len(body), global_loads=len(glds), loads_128=sum(".128" in o for o in glds),
                stream_loads=len(streamed), stream_bytes_per_lane=sum(load_bytes(o) for o in streamed),
                stream_load_width=max((load_bytes(o) for o in streamed), default=0),
                stream_loads_before_first_use=before,
                load_opcodes=sorted(set(glds)), _body=body)


def iteration_cycles(body, stream, dram_cyc, l2_cyc):
    """Cycles one warp spends per loop iteration, alone on its scheduler: three passes of the body
    in SASS order with a register scoreboard; the third pass is the steady state."""
    ready, t, marks = {}, 0.0, []
    for _ in range(3):
        marks.append(t)
        for _, op, opnds in body:
            d, s = dest_and_srcs(op, opnds)
            t = max([t + 1] + [ready.get(r, 0) for r in s])
            lat = (dram_cyc if stream(op) else l2_cyc) if op.startswith("LDG") else 30 if op.startswith(("LDS", "SHFL")) else 4
            for r in d:
                ready[r] = t + lat
    return t - marks[2]


def kernel_table(arch, src, workdir, nvdisasm):
    """Compiles, parses ptxas and SASS; returns {readable name: stats} for the bf16 kernels."""
    cubin, ptx = compile_cubin(src, arch, workdir)
    props = parse_ptxas(ptx)
    dis = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    sass, names = parse_sass(dis), demangle(list(props))
    out = {}
    for mangled, p in props.items():
        name = names[mangled]
        if "bfloat16" not in name:
            continue
        kind = ("qgemv_mma" if "quantized_mma_gemv_kernel" in name else
                "qgemv" if "quantized_gemv_kernel" in name else "gemv" if "gemv_kernel" in name else "gemv_mma" if "gemv_mma_kernel" in name else
                "combine" if "combine" in name else
                "attention" if "decode_attention" in name else "rms_norm" if "rms_norm" in name else
                "silu_mul" if "silu_mul" in name else "splice")
        # DRAM-stream loads: the GEMVs' evict-first weight loads; attention's K/V loads, not the
        # coherent (.STRONG, __ldcg) loads of the split partials its last block merges from L2.
        if kind in ("gemv", "gemv_mma", "qgemv", "qgemv_mma"):
            stream = lambda op: ".EF" in op
        elif kind == "attention":
            stream = lambda op: op.startswith("LDG") and ".STRONG" not in op
        else:
            stream = lambda op: op.startswith("LDG")
        loop = analyse_loop(sass.get(mangled, dict(insns=[], labels={})), stream)
        occ = occupancy(arch, p["regs"], p["smem"], BLOCK.get(kind, 256))
        out[name] = dict(kind=kind, mangled=mangled, **p, **occ, loop=loop, _stream=stream,
                         sass_instructions=len(sass.get(mangled, {}).get("insns", [])))
    return out
