"""scripts/static_report.py's reading of the source tree it compiles (this one, or another with
--kernels-source): where its CUDA kernels are, and the launch and fusion choices its decoder
makes, so that a before/after pair each models its own."""
import os, re, subprocess, sys

def cuda_kernels_dir(source_dir):
    """The CUDA kernel headers of a tree (csrc/kernels/cuda; csrc/cuda/kernels in older trees, so
    a before/after pair can straddle the move)."""
    new = os.path.join(source_dir, "csrc/kernels/cuda")
    return new if os.path.isdir(new) else os.path.join(source_dir, "csrc/cuda/kernels")


def all_kernels_source(source_dir, workdir):
    """A .cu that compiles every kernel instantiation of a tree: each kernel header's own
    instantiation block (EMU_FAST_INSTANTIATE_KERNELS), or kernels_check.cu in older trees."""
    kdir = os.path.abspath(cuda_kernels_dir(source_dir))  # the .cu is written elsewhere
    old = os.path.join(kdir, "kernels_check.cu")
    if os.path.exists(old):
        return old
    path = os.path.join(workdir, "kernels_all.cu")
    with open(path, "w") as f:
        f.write("#define EMU_FAST_INSTANTIATE_KERNELS\n")
        f.writelines(f'#include "{os.path.join(kdir, h)}"\n' for h in sorted(os.listdir(kdir)) if h.endswith(".cuh"))
    return path


def decoder_source(source_dir):
    """The decoder's C++ source of a tree as one text (csrc/decoder/*.cpp; csrc/decoder.cpp in older trees)."""
    d = os.path.join(source_dir, "csrc/decoder")
    paths = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".cpp")) if os.path.isdir(d) else [
        os.path.join(source_dir, "csrc/decoder.cpp")]
    return "".join(open(p).read() for p in paths)


def fused_layer(source_dir):
    """Whether the decoder in the source compiled folds the norms and residual adds into its
    GEMVs (norm_gemv / gemv_add), as EmuDecoder::run_layers does since fb65004."""
    src = decoder_source(source_dir)
    return "gemv_add(" in src or "ops::gemv_add>" in src


def silu_epilogue(source_dir):
    """Whether the gate/up GEMV writes silu(gate) * up itself (norm_gemv_silu, since 8d435e2)."""
    src = decoder_source(source_dir)
    return "norm_gemv_silu(" in src or "ops::norm_gemv_silu>" in src


def pdl_launches(source_dir):
    """Whether the step's kernels launch with programmatic dependent launch in the source compiled
    (the GEMV launcher uses EMU_FAST_LAUNCH_PDL and common.cuh issues griddepcontrol.wait)."""
    kdir = cuda_kernels_dir(source_dir)
    return ("griddepcontrol.wait" in open(os.path.join(kdir, "common.cuh")).read()
            and "EMU_FAST_LAUNCH_PDL(" in open(os.path.join(kdir, "gemv.cuh")).read())


def combine_folded(source_dir):
    """Whether the decoder passes split_counters, so attention merges its splits in the same launch."""
    return "split_counters" in decoder_source(source_dir)


def split_rule(source_dir):
    """(blocks per SM decode_attention_splits aims at, cache rows per split at most), read from
    the source compiled (so a before/after pair each models its own split rule)."""
    text = open(os.path.join(cuda_kernels_dir(source_dir), "decode_attention.cuh")).read()
    m = re.search(r"want = \((\d+) \* static_cast<int64_t>\(sm_count\)", text)
    r = re.search(r"\(capacity \+ (\d+)\) / (\d+)", text)
    if not m or not r:
        sys.exit("static_report: cannot find decode_attention_splits' rule in decode_attention.cuh; update "
                 "split_rule()")
    return int(m.group(1)), int(r.group(2))


def describe(src):
    """The compiled tree as `path @ commit (+ uncommitted changes)`, so before/after are traceable."""
    git = lambda *c: subprocess.run(["git", "-C", src, *c], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "csrc")
    return f"{os.path.abspath(src)} @ {git('rev-parse', '--short', 'HEAD') or '?'}" + (" + uncommitted csrc changes" if dirty else "")
