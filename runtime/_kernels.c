/* ONNX Runtime kernels of our own, loaded into a session as a custom-op library.
 *
 * One op, edge_exporter.MatMul4BitOffsets(x, codes, d, o) -> y with attributes K and N:
 * x [..., K] float times 4-bit blocks of 32 whose weights are d * (q - 8) + o, with d
 * [N, K/32] and o [K/32, N] float16 (GGUF Q4_1, d*q + m, carried without a second
 * rounding: o = m + 8d). The arithmetic is in _q4_math.h. Bundles hold the op as a
 * model-local ONNX function whose body computes the same in standard ops (MatMulNBits +
 * block sums @ o), so a bundle runs on any onnxruntime; a session that registers this
 * library (runtime/model.py) runs the node with the kernel below instead: float
 * activations like the body, but the float16 tables read as stored and no separate offset
 * MatMul, Add and block sums (SmolLM2 decode: 87.6 against 55.1 tokens/s on AVX-512).
 *
 * The library registers the op only where it has a vector path (x86 with AVX-512, or AVX2 +
 * FMA + F16C); elsewhere it registers nothing and the function body runs. EDGE_Q4_ISA
 * (avx512, avx2, scalar, off), read when a session registers the library, forces a path,
 * for tests (a vector one only where the CPU runs it); any other value is an error.
 *
 * ONNX Runtime's C API is a table of function pointers that only grows: we declare the
 * few entries we call by their position in it (API version 17, onnxruntime 1.17) and the
 * OrtCustomOp layout up to its version-16 members, rather than vendor its header. The same
 * shared object is a Python extension (`isa()`), so pip builds it like the tokenizer and the
 * runtime finds it by import.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_q4_math.h"

/* ------------------------------------------------ the parts of the C API we use */

typedef struct OrtStatus OrtStatus;
typedef struct OrtApiBase {
    const void *const *(*GetApi)(uint32_t version);   /* the OrtApi table, or NULL */
    const char *(*GetVersionString)(void);
} OrtApiBase;

#define ORT_API_VERSION_USED 17

enum {   /* positions in the OrtApi table */
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26,
    API_CustomOpDomain_Add = 27,
    API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61,
    API_GetDimensions = 62,
    API_GetTensorTypeAndShape = 65,
    API_KernelInfoGetAttribute_int64 = 86,
    API_KernelContext_GetInput = 90,
    API_KernelContext_GetOutput = 91,
    API_ReleaseStatus = 93,
    API_ReleaseTensorTypeAndShapeInfo = 99,
    API_KernelContext_ParallelFor = 274,
};

enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_FLOAT16 = 10 };

typedef struct CustomOp CustomOp;
struct CustomOp {   /* OrtCustomOp, version 16: members up to KernelComputeV2 */
    uint32_t version;
    void *(*CreateKernel)(const CustomOp *, const void *api, const void *info);
    const char *(*GetName)(const CustomOp *);
    const char *(*GetExecutionProviderType)(const CustomOp *);
    int (*GetInputType)(const CustomOp *, size_t);
    size_t (*GetInputTypeCount)(const CustomOp *);
    int (*GetOutputType)(const CustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const CustomOp *);
    void (*KernelCompute)(void *kernel, void *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const CustomOp *, size_t);
    int (*GetOutputCharacteristic)(const CustomOp *, size_t);
    int (*GetInputMemoryType)(const CustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const CustomOp *);
    int (*GetVariadicInputHomogeneity)(const CustomOp *);
    int (*GetVariadicOutputMinArity)(const CustomOp *);
    int (*GetVariadicOutputHomogeneity)(const CustomOp *);
    OrtStatus *(*CreateKernelV2)(const CustomOp *, const void *api, const void *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, void *context);
    void *rest[7];   /* later members (version 17+): left NULL, not read at version 16 */
};

static const void *const *api;   /* set once by RegisterCustomOps */

#define API(index, type) ((type)api[API_##index])

static OrtStatus *
fail(int code, const char *message)
{
    return API(CreateStatus, OrtStatus *(*)(int, const char *))(code, message);
}

#define TRY(call)                         \
    do {                                  \
        OrtStatus *status_ = (call);      \
        if (status_ != NULL)              \
            return status_;               \
    } while (0)

/* ------------------------------------------------------------- which path */

typedef void (*q4_columns_fn)(const q4_product *, int64_t, int64_t);


static const char *
best_isa(void)
{
#ifdef Q4_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512dq"))
        return "avx512";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c"))
        return "avx2";
#endif
    return "off";
}

#define ISA_CHOICES "avx512, avx2, scalar or off"

/* The path EDGE_Q4_ISA asks for if this CPU runs it, else the best one ("off": none);
 * NULL for a value that names no path (a typo, "OFF": it was ignored, the kernel ran). */
static const char *
chosen_isa(void)
{
    const char *best = best_isa(), *asked = getenv("EDGE_Q4_ISA");
    if (asked == NULL || *asked == '\0')
        return best;
    if (strcmp(asked, "off") == 0 || strcmp(asked, "scalar") == 0)
        return strcmp(asked, "off") == 0 ? "off" : "scalar";
    if (strcmp(asked, "avx2") == 0)
        return strcmp(best, "off") != 0 ? "avx2" : best;
    if (strcmp(asked, "avx512") == 0)
        return best;   /* avx512 where the CPU runs it, else the best it has */
    return NULL;
}

static q4_columns_fn
columns_for(const char *isa)
{
#ifdef Q4_X86
    if (strcmp(isa, "avx512") == 0)
        return q4_columns_avx512;
    if (strcmp(isa, "avx2") == 0)
        return q4_columns_avx2;
#endif
    if (strcmp(isa, "scalar") == 0)
        return q4_columns_scalar;
    return NULL;
}

/* ------------------------------------------------------------------ the op */

/* Columns a ParallelFor task: few for one row (decode), so the threads share the work
 * evenly; more for many rows (prefill), so each task reads its rows fewer times. */
#define COLUMNS_PER_TASK 16
#define COLUMNS_PER_TASK_ROWS 32

typedef struct {
    int64_t k, n;
    q4_columns_fn columns;
} Kernel;

/* The op as registered for one path: onnxruntime hands `op` back to create_kernel, which
 * reads the path from it, so each session runs the path its own registration chose (a
 * process-wide path let a later registration, EDGE_Q4_ISA=off say, reach sessions made
 * earlier: a NULL path, a segfault). */
typedef struct {
    CustomOp op;   /* first: a PathOp's address is its op's */
    q4_columns_fn columns;
} PathOp;

typedef struct {
    const q4_product *product;
    q4_columns_fn columns;
    int64_t columns_per_task;
} Task;

static void
run_task(void *data, size_t i)
{
    const Task *task = data;
    int64_t n0 = (int64_t)i * task->columns_per_task, n1 = n0 + task->columns_per_task;
    if (n1 > task->product->n)
        n1 = task->product->n;
    task->columns(task->product, n0, n1);
}

static OrtStatus *
create_kernel(const CustomOp *op, const void *unused_api, const void *info, void **out)
{
    (void)unused_api;
    Kernel *kernel = calloc(1, sizeof *kernel);
    if (kernel == NULL)
        return fail(ORT_FAIL, "MatMul4BitOffsets: out of memory");
    OrtStatus *status = API(KernelInfoGetAttribute_int64,
                            OrtStatus *(*)(const void *, const char *, int64_t *))(info, "K", &kernel->k);
    if (status == NULL)
        status = API(KernelInfoGetAttribute_int64,
                     OrtStatus *(*)(const void *, const char *, int64_t *))(info, "N", &kernel->n);
    if (status == NULL && (kernel->k <= 0 || kernel->k % Q4_BLOCK || kernel->n <= 0))
        status = fail(ORT_INVALID_ARGUMENT,
                      "MatMul4BitOffsets: K must be a positive multiple of 32 and N positive");
    if (status != NULL) {
        free(kernel);
        return status;
    }
    kernel->columns = ((const PathOp *)op)->columns;
    *out = kernel;
    return NULL;
}

/* Input `index`: its data and its shape (dims up to 8). */
static OrtStatus *
input(void *context, size_t index, void **data, int64_t *dims, size_t *rank)
{
    const void *value = NULL;
    void *info = NULL;
    TRY(API(KernelContext_GetInput, OrtStatus *(*)(void *, size_t, const void **))(
        context, index, &value));
    if (value == NULL)
        return fail(ORT_INVALID_ARGUMENT, "MatMul4BitOffsets: an input is missing");
    TRY(API(GetTensorTypeAndShape, OrtStatus *(*)(const void *, void **))(value, &info));
    OrtStatus *status = API(GetDimensionsCount, OrtStatus *(*)(const void *, size_t *))(info, rank);
    if (status == NULL && *rank > 8)
        status = fail(ORT_INVALID_ARGUMENT, "MatMul4BitOffsets: more than 8 dimensions");
    if (status == NULL)
        status = API(GetDimensions, OrtStatus *(*)(const void *, int64_t *, size_t))(info, dims, *rank);
    API(ReleaseTensorTypeAndShapeInfo, void (*)(void *))(info);
    if (status != NULL)
        return status;
    return API(GetTensorMutableData, OrtStatus *(*)(const void *, void **))(value, data);
}

static int64_t
count(const int64_t *dims, size_t rank)
{
    int64_t total = 1;
    for (size_t i = 0; i < rank; i++)
        total *= dims[i];
    return total;
}

static OrtStatus *
compute(void *kernel_data, void *context)
{
    const Kernel *kernel = kernel_data;
    const int64_t k = kernel->k, n = kernel->n, blocks = k / Q4_BLOCK;
    void *x, *codes, *scales, *offsets, *y;
    int64_t dims[8], shape[8];
    size_t rank, x_rank;

    TRY(input(context, 0, &x, shape, &x_rank));
    if (x_rank < 1 || shape[x_rank - 1] != k)
        return fail(ORT_INVALID_ARGUMENT, "MatMul4BitOffsets: x's last dimension is not K");
    /* shapes, not only sizes: a transposed table has the right size and gives garbage */
    TRY(input(context, 1, &codes, dims, &rank));
    if (rank != 3 || dims[0] != n || dims[1] != blocks || dims[2] != Q4_BLOCK / 2)
        return fail(ORT_INVALID_ARGUMENT, "MatMul4BitOffsets: codes are not N x K/32 x 16 bytes");
    TRY(input(context, 2, &scales, dims, &rank));
    if (rank != 2 || dims[0] != n || dims[1] != blocks)
        return fail(ORT_INVALID_ARGUMENT, "MatMul4BitOffsets: scales are not N x K/32");
    TRY(input(context, 3, &offsets, dims, &rank));
    if (rank != 2 || dims[0] != blocks || dims[1] != n)
        return fail(ORT_INVALID_ARGUMENT, "MatMul4BitOffsets: offsets are not K/32 x N");

    const int64_t m = count(shape, x_rank - 1);
    shape[x_rank - 1] = n;
    void *y_value = NULL;
    TRY(API(KernelContext_GetOutput, OrtStatus *(*)(void *, size_t, const int64_t *, size_t,
                                                    void **))(context, 0, shape, x_rank, &y_value));
    TRY(API(GetTensorMutableData, OrtStatus *(*)(const void *, void **))(y_value, &y));
    if (m == 0)
        return NULL;

    /* the GEMM paths for 16 rows or more read x grouped by rows instead */
    const int rows = m >= Q4_GROUP && kernel->columns != q4_columns_scalar;
    const int64_t xs_size = q4_xs_size(m, blocks);
    float *scratch = malloc((size_t)(xs_size + m * blocks) * sizeof(float));
    if (scratch == NULL)
        return fail(ORT_FAIL, "MatMul4BitOffsets: out of memory");
    if (rows)   /* the same size as xs: whole groups of 16 rows */
        q4_prepare_rows(x, m, k, scratch, scratch + xs_size);
    else
        q4_prepare(x, m, blocks, scratch, scratch + xs_size);
    const q4_product product = {
        .xs = rows ? NULL : scratch, .xg = rows ? scratch : NULL, .sums = scratch + xs_size, .codes = codes, .scales = scales,
        .offsets = offsets, .y = y, .m = m, .n = n, .blocks = blocks,
    };
    Task task = {&product, kernel->columns, m >= 8 ? COLUMNS_PER_TASK_ROWS : COLUMNS_PER_TASK};
    OrtStatus *status = API(KernelContext_ParallelFor,
                            OrtStatus *(*)(void *, void (*)(void *, size_t), size_t, size_t,
                                           void *))(
        context, run_task, (size_t)((n + task.columns_per_task - 1) / task.columns_per_task), 0,
        &task);
    free(scratch);
    return status;
}

static void destroy_kernel(void *kernel) { free(kernel); }
static const char *op_name(const CustomOp *op) { (void)op; return "MatMul4BitOffsets"; }
static const char *op_provider(const CustomOp *op) { (void)op; return NULL; }   /* CPU */
static size_t op_inputs(const CustomOp *op) { (void)op; return 4; }
static size_t op_outputs(const CustomOp *op) { (void)op; return 1; }
static int op_required(const CustomOp *op, size_t i) { (void)op, (void)i; return 0; }
static int op_default_memory(const CustomOp *op, size_t i) { (void)op, (void)i; return 0; }
static int op_output_type(const CustomOp *op, size_t i) { (void)op, (void)i; return TYPE_FLOAT; }
static int
op_input_type(const CustomOp *op, size_t i)
{
    (void)op;
    return i == 0 ? TYPE_FLOAT : i == 1 ? TYPE_UINT8 : TYPE_FLOAT16;
}

#define MATMUL_4BIT_OFFSETS                     \
    {                                           \
        .version = 16,                          \
        .GetName = op_name,                     \
        .GetExecutionProviderType = op_provider, \
        .GetInputType = op_input_type,          \
        .GetInputTypeCount = op_inputs,         \
        .GetOutputType = op_output_type,        \
        .GetOutputTypeCount = op_outputs,       \
        .KernelDestroy = destroy_kernel,        \
        .GetInputCharacteristic = op_required,  \
        .GetOutputCharacteristic = op_required, \
        .GetInputMemoryType = op_default_memory, \
        .CreateKernelV2 = create_kernel,        \
        .KernelComputeV2 = compute,             \
    }

static const PathOp path_ops[] = {
#ifdef Q4_X86
    {MATMUL_4BIT_OFFSETS, q4_columns_avx512},
    {MATMUL_4BIT_OFFSETS, q4_columns_avx2},
#endif
    {MATMUL_4BIT_OFFSETS, q4_columns_scalar},
};

/* The op that runs `columns`; NULL for none ("off"). */
static const PathOp *
path_op(q4_columns_fn columns)
{
    for (size_t i = 0; columns != NULL && i < sizeof path_ops / sizeof *path_ops; i++)
        if (path_ops[i].columns == columns)
            return &path_ops[i];
    return NULL;
}

/* Called by onnxruntime (SessionOptions.register_custom_ops_library). Registers nothing
 * where there is no path to run, so the bundle's function body runs instead. */
#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
OrtStatus *
RegisterCustomOps(void *options, const OrtApiBase *base)
{
    const void *const *table = base->GetApi(ORT_API_VERSION_USED);
    if (table == NULL)
        return NULL;   /* an onnxruntime older than 1.17: nothing registered */
    api = table;
    const char *isa = chosen_isa();
    if (isa == NULL)
        return fail(ORT_INVALID_ARGUMENT, "EDGE_Q4_ISA names no path of runtime._kernels: "
                    "set it to " ISA_CHOICES ", or unset it for the best path here");
    const PathOp *path = path_op(columns_for(isa));
    if (path == NULL)
        return NULL;
    void *domain = NULL;
    TRY(API(CreateCustomOpDomain, OrtStatus *(*)(const char *, void **))("edge_exporter", &domain));
    TRY(API(CustomOpDomain_Add, OrtStatus *(*)(void *, const CustomOp *))(domain, &path->op));
    /* the session options keep the domain; onnxruntime's own samples never release it */
    return API(AddCustomOpDomain, OrtStatus *(*)(void *, void *))(options, domain);
}

/* ----------------------------------------------------------- Python module */

static PyObject *
kernels_isa(PyObject *module, PyObject *unused)
{
    (void)module, (void)unused;
    const char *isa = chosen_isa();
    if (isa == NULL)
        return PyErr_Format(PyExc_ValueError, "EDGE_Q4_ISA='%s' names no path of runtime._kernels: "
                            "set it to " ISA_CHOICES ", or unset it for the best path here.",
                            getenv("EDGE_Q4_ISA"));
    return PyUnicode_FromString(isa);
}

static PyMethodDef kernels_methods[] = {
    {"isa", kernels_isa, METH_NOARGS,
     "isa() -> str\n--\n\nThe path MatMul4BitOffsets runs on here: 'avx512', 'avx2', "
     "'scalar' (EDGE_Q4_ISA=scalar, tests) or 'off' (not registered: the bundle's "
     "function body runs)."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot kernels_slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "runtime._kernels",
    .m_doc = "ONNX Runtime custom-op library (MatMul4BitOffsets); see _kernels.c.",
    .m_size = 0,
    .m_methods = kernels_methods,
    .m_slots = kernels_slots,
};

PyMODINIT_FUNC
PyInit__kernels(void)
{
    return PyModuleDef_Init(&kernels_module);
}
