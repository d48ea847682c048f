using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Text.Json;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Checkpoints;

/// <summary>One tensor's entry in a safetensors header.</summary>
/// <param name="Name">Checkpoint key.</param>
/// <param name="DType">safetensors dtype string (F32, F16, BF16, I64, ...).</param>
/// <param name="Shape">Dimensions.</param>
/// <param name="Begin">Start of the data, relative to the end of the header.</param>
/// <param name="End">End of the data (exclusive).</param>
public sealed record SafeTensorEntry(string Name, string DType, long[] Shape, long Begin, long End);

/// <summary>
/// Reads one <c>.safetensors</c> file: an 8-byte header length, a JSON header, then raw little-endian tensor data.
/// Tensors are read through a memory map, one at a time, so loading never holds a second copy of the whole file.
/// </summary>
public sealed class SafeTensorsFile : IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly long _dataStart;
    private readonly long _length;

    private SafeTensorsFile(string path, MemoryMappedFile map, long dataStart, long length, Dictionary<string, SafeTensorEntry> entries, Dictionary<string, string> metadata)
    {
        Path = path;
        _map = map;
        _dataStart = dataStart;
        _length = length;
        Entries = entries;
        Metadata = metadata;
    }

    /// <summary>The file's path.</summary>
    public string Path { get; }

    /// <summary>The tensors this file holds, by name.</summary>
    public IReadOnlyDictionary<string, SafeTensorEntry> Entries { get; }

    /// <summary>The header's <c>__metadata__</c> (string to string), empty when absent.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Opens and validates a safetensors file.</summary>
    /// <exception cref="ModelLoadException">The file is missing, truncated or has a malformed header.</exception>
    public static SafeTensorsFile Open(string path)
    {
        if (!File.Exists(path))
        {
            throw new ModelLoadException($"Weights file not found: '{path}'.");
        }
        var length = new FileInfo(path).Length;
        if (length < 8)
        {
            throw new ModelLoadException($"'{path}' is not a safetensors file (only {length} bytes).");
        }
        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        try
        {
            using var view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            var headerLength = view.ReadInt64(0);
            if (headerLength <= 0 || headerLength > length - 8 || headerLength > 100_000_000)
            {
                throw new ModelLoadException($"'{path}' is not a safetensors file: header length {headerLength} does not fit a {length}-byte file.");
            }
            var header = new byte[headerLength];
            view.ReadArray(8, header, 0, header.Length);
            var (entries, metadata) = ParseHeader(path, header, length - 8 - headerLength);
            return new SafeTensorsFile(path, map, 8 + headerLength, length, entries, metadata);
        }
        catch
        {
            map.Dispose();
            throw;
        }
    }

    /// <summary>Reads a tensor onto the CPU in the file's dtype.</summary>
    public Tensor Read(string name)
    {
        if (!Entries.TryGetValue(name, out var entry))
        {
            throw new ModelLoadException($"'{Path}' has no tensor '{name}'.");
        }
        var dtype = ToScalarType(entry.DType) ?? throw new ModelLoadException($"'{Path}': tensor '{name}' has unsupported dtype '{entry.DType}'.");
        var count = entry.End - entry.Begin;
        var tensor = empty(entry.Shape, dtype);
        using var view = _map.CreateViewAccessor(_dataStart + entry.Begin, count, MemoryMappedFileAccess.Read);
        unsafe
        {
            byte* source = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref source);
            try
            {
                var span = new ReadOnlySpan<byte>(source + view.PointerOffset, checked((int)count));
                span.CopyTo(tensor.bytes);
            }
            finally
            {
                view.SafeMemoryMappedViewHandle.ReleasePointer();
            }
        }
        return tensor;
    }

    /// <summary>Maps a safetensors dtype string to a TorchSharp dtype.</summary>
    public static ScalarType? ToScalarType(string dtype) => dtype switch
    {
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "F64" => ScalarType.Float64,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => null,
    };

    /// <summary>Maps a TorchSharp dtype to its safetensors string.</summary>
    public static string ToSafeTensorsDType(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Float64 => "F64",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new ArgumentException($"dtype {dtype} has no safetensors name.", nameof(dtype)),
    };

    /// <summary>Writes tensors (moved to CPU, contiguous) as one safetensors file, with optional metadata.</summary>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var ordered = tensors.OrderBy(t => t.Key, StringComparer.Ordinal).ToList();
        var header = new Dictionary<string, object>(StringComparer.Ordinal);
        if (metadata is { Count: > 0 })
        {
            header["__metadata__"] = metadata;
        }
        long offset = 0;
        var blobs = new List<byte[]>(ordered.Count);
        foreach (var (name, tensor) in ordered)
        {
            // The scope keeps detach()'s and cpu()'s results referenced until the copy is done (a temporary can otherwise
            // be finalised mid-copy: a device-to-host copy on CUDA is long enough for that to happen) and frees them.
            using var scope = NewDisposeScope();
            var cpu = tensor.detach().cpu().contiguous();
            var bytes = cpu.bytes.ToArray();
            blobs.Add(bytes);
            header[name] = new Dictionary<string, object>
            {
                ["dtype"] = ToSafeTensorsDType(cpu.dtype),
                ["shape"] = cpu.shape,
                ["data_offsets"] = new[] { offset, offset + bytes.Length },
            };
            offset += bytes.Length;
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(header, SafeTensorsJsonContext.Default.DictionaryStringObject);
        // The header is padded with spaces to 8 bytes so data starts aligned, as the reference writer does.
        var padded = (json.Length + 7) / 8 * 8;
        var temp = path + ".tmp";
        using (var stream = File.Create(temp))
        {
            Span<byte> lengthBytes = stackalloc byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(lengthBytes, padded);
            stream.Write(lengthBytes);
            stream.Write(json);
            for (var i = json.Length; i < padded; i++)
            {
                stream.WriteByte((byte)' ');
            }
            foreach (var blob in blobs)
            {
                stream.Write(blob);
            }
        }
        File.Move(temp, path, overwrite: true);
    }

    private static (Dictionary<string, SafeTensorEntry> Entries, Dictionary<string, string> Metadata) ParseHeader(string path, byte[] header, long dataLength)
    {
        var entries = new Dictionary<string, SafeTensorEntry>(StringComparer.Ordinal);
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        try
        {
            using var document = JsonDocument.Parse(header);
            foreach (var property in document.RootElement.EnumerateObject())
            {
                if (property.Name == "__metadata__")
                {
                    if (property.Value.ValueKind == JsonValueKind.Object)
                    {
                        foreach (var item in property.Value.EnumerateObject())
                        {
                            metadata[item.Name] = item.Value.ValueKind == JsonValueKind.String ? item.Value.GetString() ?? "" : item.Value.GetRawText();
                        }
                    }
                    continue;
                }
                var value = property.Value;
                var dtype = value.GetProperty("dtype").GetString() ?? "";
                var shape = value.GetProperty("shape").EnumerateArray().Select(x => x.GetInt64()).ToArray();
                var offsets = value.GetProperty("data_offsets").EnumerateArray().Select(x => x.GetInt64()).ToArray();
                if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0] || offsets[1] > dataLength)
                {
                    throw new ModelLoadException($"'{path}': tensor '{property.Name}' has data offsets outside the file (truncated download?).");
                }
                var elementSize = ToScalarType(dtype) is { } st ? ElementSize(st) : 0;
                var elements = shape.Aggregate(1L, (a, b) => a * b);
                if (elementSize > 0 && elements * elementSize != offsets[1] - offsets[0])
                {
                    throw new ModelLoadException($"'{path}': tensor '{property.Name}' has shape [{string.Join(",", shape)}] but {offsets[1] - offsets[0]} bytes.");
                }
                entries[property.Name] = new SafeTensorEntry(property.Name, dtype, shape, offsets[0], offsets[1]);
            }
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            throw new ModelLoadException($"'{path}' has a malformed safetensors header: {e.Message}", e);
        }
        return (entries, metadata);
    }

    private static int ElementSize(ScalarType type) => type switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        _ => 1,
    };

    /// <inheritdoc/>
    public void Dispose() => _map.Dispose();

    /// <summary>Total file size in bytes.</summary>
    public long Length => _length;
}
