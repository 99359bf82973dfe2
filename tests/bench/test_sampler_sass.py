"""The SASS path measurement behind the sampler's instruction budget
(fastdf.bench.compile.common_path / sampler_first_pass), on fixed cuobjdump text."""

from fastdf.bench import compile as C

# A loop (0x10 .. 0xb0) over 2 logits of one 16-byte load: a rare block (0x50 .. 0x70,
# entered when P0) that the common path skips, an exponential on either side of a branch,
# and an exit branch out of the loop.
SASS = """
        Function : _k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/                   FFMA R8, R4, R0, -R9 ;
        /*0030*/                   MUFU.EX2 R8, R8 ;
        /*0040*/              @!P0 BRA 0x80 ;
        /*0050*/                   SHFL.BFLY PT, R10, R8, 0x1, 0x1f ;
        /*0060*/                   ATOMS.ADD RZ, [R11], R10 ;
        /*0070*/              @P2 BRA 0xc0 ;
        /*0080*/                   FFMA R12, R5, R0, -R9 ;
        /*0090*/                   MUFU.EX2 R12, R12 ;
        /*00a0*/                   FADD R13, R8, R12 ;
        /*00b0*/               @P1 BRA 0x10 ;
        /*00c0*/                   EXIT ;
"""


def _body():
    instrs = C._sass_with_predicates(SASS)["_k"]
    return instrs[1:12]  # loop head 0x10 .. back edge 0xb0


def test_common_path_skips_rare_blocks_but_not_work():
    body = _body()
    assert C.common_path(body, 2) == 8  # 0x10-0x40, then 0x80-0xb0: the rare block is skipped
    # an exponential more than the loop holds: no such path
    assert C.common_path(body, 3) is None


def test_first_pass_is_found_by_source_line():
    """The loop whose head and back edge carry lines of the first-pass function; 16-bit
    logits (8 a 16-byte load) need 8 exponentials on the path, this loop has 2: no path."""
    source = "int a;\n__device__ void scan_sample(int x) {\n  body;\n  more;\n}\n"
    lines = ".text._k:\n" + "".join(f'\t//## File "s.cu", line 3\n        /*{a:04x}*/ X ;\n'
                                    for a in range(0, 0xd0, 0x10))
    assert C._function_lines(source, C.SAMPLER_FIRST_PASS) == (2, 5)
    got = C.sampler_first_pass(SASS, lines, source, {"_k": "void sample_kernel<float, true>(float const*)"})
    assert got["float"]["loop_instructions"] == 11 and got["float"]["wide_loads"] == 1
    assert got["float"]["logits_per_iteration"] == 4 and got["float"]["path_instructions"] is None
    # the same loop with lines outside the function: not the first pass
    outside = lines.replace("line 3", "line 9")
    assert C.sampler_first_pass(SASS, outside, source, {"_k": "void sample_kernel<float, true>(float const*)"}) == {}
