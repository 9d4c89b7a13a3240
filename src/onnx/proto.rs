//! The few ONNX protobuf messages an exported model needs, written in protobuf's wire format
//! by hand (field numbers from `onnx/onnx.proto`): a model is a graph of nodes over named
//! tensors, with the weights as initializers. Only what we write is here; nothing is read.

/// A protobuf message being written: fields appended in order.
#[derive(Default, Clone)]
pub struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }

    /// An integer field (int32, int64, enum; negative values as ten-byte varints).
    pub fn int(mut self, field: u32, v: i64) -> Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }

    /// A float field.
    pub fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A bytes or string field.
    pub fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }

    pub fn str(self, field: u32, v: &str) -> Self {
        self.bytes(field, v.as_bytes())
    }

    /// An embedded message field.
    pub fn msg(self, field: u32, m: &Msg) -> Self {
        self.bytes(field, &m.0)
    }

    /// A packed repeated int64 field.
    pub fn ints(self, field: u32, vs: &[i64]) -> Self {
        let mut packed = Msg::default();
        for &v in vs {
            packed.varint(v as u64);
        }
        self.bytes(field, &packed.0)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// TensorProto data types.
pub const FLOAT: i64 = 1;
pub const INT64: i64 = 7;

/// A TensorProto: `name`, `dims`, the values as little-endian raw data.
pub fn tensor(name: &str, dims: &[i64], data_type: i64, raw: &[u8]) -> Msg {
    Msg::default()
        .ints(1, dims)
        .int(2, data_type)
        .str(8, name)
        .bytes(9, raw)
}

pub fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> Msg {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, dims, FLOAT, &raw)
}

pub fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> Msg {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, dims, INT64, &raw)
}

/// A node attribute.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

/// An AttributeProto.
pub fn attribute(name: &str, a: &Attr) -> Msg {
    let m = Msg::default().str(1, name);
    match a {
        Attr::Float(v) => m.float(2, *v).int(20, 1),
        Attr::Int(v) => m.int(3, *v).int(20, 2),
        Attr::Ints(vs) => m.ints(8, vs).int(20, 7),
    }
}

/// A NodeProto.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: &[(&str, Attr)],
) -> Msg {
    let mut m = Msg::default();
    for i in inputs {
        m = m.str(1, i);
    }
    for o in outputs {
        m = m.str(2, o);
    }
    m = m.str(3, name).str(4, op);
    for (n, a) in attrs {
        m = m.msg(5, &attribute(n, a));
    }
    m
}

/// A dimension of a value's shape: a number, or a named symbolic one.
pub enum Dim {
    Fixed(i64),
    Named(String),
}

/// A ValueInfoProto of a float tensor.
pub fn value_info(name: &str, dims: &[Dim]) -> Msg {
    let mut shape = Msg::default();
    for d in dims {
        let dim = match d {
            Dim::Fixed(v) => Msg::default().int(1, *v),
            Dim::Named(s) => Msg::default().str(2, s),
        };
        shape = shape.msg(1, &dim);
    }
    let tensor_type = Msg::default().int(1, FLOAT).msg(2, &shape);
    let ty = Msg::default().msg(1, &tensor_type);
    Msg::default().str(1, name).msg(2, &ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_encode_as_protobuf_does() {
        // Field 1 varint 150: 08 96 01 (the protobuf documentation's example).
        assert_eq!(Msg::default().int(1, 150).into_bytes(), [0x08, 0x96, 0x01]);
        // Field 2 string "testing": 12 07 74 65 73 74 69 6e 67.
        assert_eq!(
            Msg::default().str(2, "testing").into_bytes(),
            [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']
        );
        // -1 as an int64: ten bytes.
        assert_eq!(Msg::default().int(1, -1).into_bytes().len(), 11);
        // Packed [3, 270]: 0a 03 03 8e 02.
        assert_eq!(
            Msg::default().ints(1, &[3, 270]).into_bytes(),
            [0x0a, 0x03, 0x03, 0x8e, 0x02]
        );
    }
}
